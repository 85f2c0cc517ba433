import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop

from ftpalg.core import packet
from ftpalg.core.packet import DecodeError, TcpFlags


def scapy_bytes(pkt) -> bytes:
    return bytes(pkt.__class__(bytes(pkt)))


def v4(payload=b"", seq=1000, ack=2000, flags="PA", options=()):
    return scapy_bytes(IP(src="10.0.0.2", dst="203.0.113.2", id=7, ttl=63)
                       / TCP(sport=40000, dport=21, seq=seq, ack=ack, flags=flags, options=list(options))
                       / payload)


def test_decode_v4():
    seg = packet.decode(v4(b"PORT 10,0,0,2,1,1\r\n"))
    assert (seg.version, seg.sport, seg.dport, seg.seq, seg.ack) == (4, 40000, 21, 1000, 2000)
    assert seg.flags == TcpFlags.PSH | TcpFlags.ACK
    assert seg.src == bytes([10, 0, 0, 2]) and seg.payload == b"PORT 10,0,0,2,1,1\r\n"
    assert not seg.truncated


def test_encode_matches_scapy_checksums():
    raw = v4(b"PORT 10,0,0,2,1,1\r\n", options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])
    new_payload = b"PORT 203,0,113,1,1,1\r\n"
    out = packet.encode(packet.decode(raw), new_payload, 1003, 1999)
    want = IP(raw)
    want[TCP].seq, want[TCP].ack = 1003, 1999
    want[TCP].remove_payload()
    want = want / new_payload
    del want[IP].len, want[IP].chksum, want[TCP].chksum
    assert out == bytes(want)


def test_sack_blocks_are_mapped():
    raw = v4(b"", flags="A", options=[("NOP", None), ("NOP", None), ("SAck", (3000, 3100, 3200, 3300))])
    seg = packet.decode(raw)
    assert seg.sack_blocks() == [(3000, 3100), (3200, 3300)]
    out = packet.encode(seg, b"", seg.seq, seg.ack - 4, lambda x: x - 4)
    assert packet.decode(out).sack_blocks() == [(2996, 3096), (3196, 3296)]
    parsed = IP(out)
    assert parsed[TCP].options[-1] == ("SAck", (2996, 3096, 3196, 3296))
    assert out == scapy_bytes(_without_checksums(parsed))


def _without_checksums(p):
    del p[IP].chksum, p[TCP].chksum
    return p


def test_v6_roundtrip():
    raw = scapy_bytes(IPv6(src="fd00::2", dst="fd00:1::2") / TCP(sport=40000, dport=21, seq=5, ack=6, flags="PA")
                      / b"EPRT |2|fd00::2|5000|\r\n")
    seg = packet.decode(raw)
    assert seg.version == 6 and seg.payload.startswith(b"EPRT")
    out = packet.encode(seg, b"EPRT |2|fd00:1::1|5000|\r\n", 5, 6)
    want = IPv6(raw)
    want[TCP].remove_payload()
    want = want / b"EPRT |2|fd00:1::1|5000|\r\n"
    del want[IPv6].plen, want[TCP].chksum
    assert out == bytes(want)


def test_truncated_copy_is_detected():
    raw = v4(b"x" * 100)
    assert packet.decode(raw[:80]).truncated


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x45" + b"\x00" * 10,
        bytes(IP(dst="1.2.3.4") / b"udp?"),  # proto 0
        scapy_bytes(IP(dst="1.2.3.4", flags="MF") / TCP()),
        bytes(IP(dst="1.2.3.4") / TCP())[:30],
        b"\x75" + b"\x00" * 40,
    ],
)
def test_undecodable(raw):
    with pytest.raises(DecodeError):
        packet.decode(raw)


def test_checksum_known_vector():
    # RFC 1071 §3 example
    assert packet.checksum(bytes.fromhex("0001f203f4f5f6f7")) == (~0xDDF2) & 0xFFFF


# ---- IPv6 (RFC 8200; TCP checksum over the IPv6 pseudo-header, RFC 8200 §8.1) --------------------

V6_SRC, V6_DST = "fd00::2", "2001:db8:1::21"


def v6(payload=b"", seq=1000, ack=2000, flags="PA", options=(), tc=0, fl=0):
    return scapy_bytes(IPv6(src=V6_SRC, dst=V6_DST, hlim=63, tc=tc, fl=fl)
                       / TCP(sport=40000, dport=21, seq=seq, ack=ack, flags=flags, window=502, options=list(options))
                       / payload)


def _scapy_valid_v6(out: bytes):
    """Parse ``out`` with scapy and check its lengths and TCP checksum by letting scapy
    recompute them; returns the parsed packet."""
    p = IPv6(out)
    recomputed = p.copy()
    del recomputed[IPv6].plen, recomputed[TCP].chksum
    recomputed = IPv6(bytes(recomputed))
    assert p[IPv6].plen == len(out) - 40 == recomputed[IPv6].plen
    assert p[TCP].chksum == recomputed[TCP].chksum
    return p


SACK_OPTS = [("NOP", None), ("NOP", None), ("Timestamp", (7, 8)), ("NOP", None), ("NOP", None),
             ("SAck", (3000, 3100, 3200, 3300))]


def test_decode_v6_fields():
    payload = b"EPRT |2|fd00::2|50000|\r\n"
    raw = v6(payload, seq=0xFFFFFFF0, ack=12345, options=SACK_OPTS, tc=0x20, fl=0xABCDE)
    seg = packet.decode(raw)
    ref = IPv6(raw)
    assert (seg.version, seg.ip_hlen, seg.tcp_off) == (6, 40, 40)
    assert seg.src == socket.inet_pton(socket.AF_INET6, V6_SRC)
    assert seg.dst == socket.inet_pton(socket.AF_INET6, V6_DST)
    assert (seg.sport, seg.dport, seg.seq, seg.ack) == (ref[TCP].sport, ref[TCP].dport, 0xFFFFFFF0, 12345)
    assert seg.flags == TcpFlags.PSH | TcpFlags.ACK == int(ref[TCP].flags)
    assert seg.tcp_hlen == ref[TCP].dataofs * 4 == 20 + 32
    assert seg.total_len == len(raw) == 40 + ref[IPv6].plen
    assert seg.payload == payload and not seg.truncated
    assert seg.sack_blocks() == [(3000, 3100), (3200, 3300)]


@pytest.mark.parametrize(
    "new_payload",
    [
        b"EPRT |2|2001:db8:1::1|50001|\r\n",  # longer
        b"EPRT |2|::1|5|\r\n",  # shorter
        b"EPRT |2|2001:db8:1::1|50001|\r\n!",  # odd length: checksum pads with a zero byte
        b"",  # pure ACK
    ],
)
def test_encode_v6_against_scapy(new_payload):
    raw = v6(b"EPRT |2|fd00::2|50000|\r\n", seq=0xFFFFFFF0, ack=2000, options=SACK_OPTS, tc=0x20, fl=0xABCDE)
    seg = packet.decode(raw)
    delta = len(new_payload) - len(seg.payload)
    out = packet.encode(seg, new_payload, seg.seq + 0x20, seg.ack - 7, lambda x: x + delta)
    p = _scapy_valid_v6(out)
    ref = IPv6(raw)
    # the IPv6 header is kept (but for the payload length), the TCP fields are the new ones
    for f in ("version", "tc", "fl", "nh", "hlim", "src", "dst"):
        assert getattr(p[IPv6], f) == getattr(ref[IPv6], f), f
    assert (p[TCP].seq, p[TCP].ack) == ((0xFFFFFFF0 + 0x20) & 0xFFFFFFFF, 1993)
    for f in ("sport", "dport", "flags", "window", "dataofs", "urgptr"):
        assert getattr(p[TCP], f) == getattr(ref[TCP], f), f
    assert p[TCP].options[:3] == ref[TCP].options[:3]
    assert p[TCP].options[-1] == ("SAck", tuple(x + delta for x in (3000, 3100, 3200, 3300)))
    assert bytes(p[TCP].payload) == new_payload
    dec = packet.decode(out)
    assert dec.payload == new_payload and dec.total_len == len(out) and not dec.truncated
    # byte for byte what scapy builds for the same fields
    want = ref.copy()
    want[TCP].seq, want[TCP].ack = p[TCP].seq, p[TCP].ack
    want[TCP].options = p[TCP].options
    want[TCP].remove_payload()
    want = want / new_payload
    del want[IPv6].plen, want[TCP].chksum
    assert out == bytes(want)


def test_encode_v6_unchanged_is_identity():
    raw = v6(b"RETR x\r\n", options=SACK_OPTS)
    seg = packet.decode(raw)
    assert packet.encode(seg, seg.payload, seg.seq, seg.ack, lambda x: x) == raw


def test_v6_truncated_copy_is_detected():
    raw = v6(b"x" * 100)
    seg = packet.decode(raw[:90])
    assert seg.truncated and seg.total_len == len(raw)


@pytest.mark.parametrize(
    "raw",
    [
        scapy_bytes(IPv6(dst="fd00::1") / IPv6ExtHdrHopByHop() / TCP()),  # extension headers are not walked
        scapy_bytes(IPv6(dst="fd00::1") / IPv6ExtHdrFragment() / TCP()),
        scapy_bytes(IPv6(dst="fd00::1") / UDP()),
        v6()[:39],
        v6()[:50],  # header cut inside TCP
        v6(options=SACK_OPTS)[:60],  # TCP data offset beyond the copy
    ],
)
def test_v6_undecodable(raw):
    with pytest.raises(DecodeError):
        packet.decode(raw)


@given(st.binary(max_size=300), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(-40, 40))
def test_encode_v6_checksums_are_valid(new_payload, seq, ack, delta):
    seg = packet.decode(v6(b"LPRT 6,16,253,0,0,0,0,0,0,0,0,0,0,0,0,0,0,2,2,25,46\r\n", options=SACK_OPTS))
    out = packet.encode(seg, new_payload, seq + delta, ack - delta, lambda x: x + delta)
    p = _scapy_valid_v6(out)
    assert (p[TCP].seq, p[TCP].ack) == ((seq + delta) & 0xFFFFFFFF, (ack - delta) & 0xFFFFFFFF)
    assert bytes(p[TCP].payload) == new_payload
    assert packet.decode(out).sack_blocks() == [((3000 + delta) & 0xFFFFFFFF, (3100 + delta) & 0xFFFFFFFF),
                                                ((3200 + delta) & 0xFFFFFFFF, (3300 + delta) & 0xFFFFFFFF)]
