import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

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
