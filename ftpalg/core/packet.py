"""IPv4/IPv6 + TCP codec for the per-packet path (no scapy).

Only what the ALG needs: addresses, ports, seq/ack, flags, SACK blocks (RFC 2018, option
kind 5) and the payload. ``encode`` rebuilds a packet with a new payload, new seq/ack and
SACK edges and fresh checksums (RFC 791 header checksum, RFC 793 TCP checksum over the
pseudo-header; RFC 8200 §8.1 for IPv6). IPv6 extension headers are not walked: a packet
whose next header is not TCP is reported as not decodable and passes unchanged.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from enum import IntFlag

IPPROTO_TCP = 6
TCPOPT_EOL = 0
TCPOPT_NOP = 1
TCPOPT_SACK = 5

_U32 = 0xFFFFFFFF
_TCP_HEAD = struct.Struct("!HHIIH")  # ports, seq, ack, data offset + flags


class TcpFlags(IntFlag):
    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10


# The same bits as plain ints, for the per-packet path: ``int & IntFlag`` builds an enum
# member each time (about 1 us on CPython 3.11), ``int & int`` does not.
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


class DecodeError(ValueError):
    """The bytes are not an IPv4/IPv6 TCP packet this codec can rewrite."""


class Segment:
    """A decoded IP+TCP packet. Offsets index into ``raw``.

    A plain class rather than a dataclass: built once per queued packet, and a hand-written
    ``__init__`` that also cuts out the payload is about twice as fast as a dataclass's with
    ``__post_init__``. ``payload`` and ``truncated`` are computed here once, not as
    properties: the per-packet walk reads them several times."""

    __slots__ = ("raw", "version", "src", "dst", "sport", "dport", "seq", "ack", "flags", "ip_hlen", "tcp_off",
                 "tcp_hlen", "total_len", "payload", "truncated")

    def __init__(self, raw: bytes, version: int, src: bytes, dst: bytes, sport: int, dport: int, seq: int,
                 ack: int, flags: int, ip_hlen: int, tcp_off: int, tcp_hlen: int, total_len: int) -> None:
        self.raw = raw
        self.version = version
        self.src = src  # packed address, 4 or 16 bytes
        self.dst = dst
        self.sport = sport
        self.dport = dport
        self.seq = seq
        self.ack = ack
        self.flags = flags
        self.ip_hlen = ip_hlen  # bytes of IP header (IPv6: 40)
        self.tcp_off = tcp_off  # offset of the TCP header in raw
        self.tcp_hlen = tcp_hlen
        self.total_len = total_len  # length the IP header announces for the whole packet
        self.payload = raw[tcp_off + tcp_hlen : total_len]
        self.truncated = len(raw) < total_len  # the copy we were handed is shorter than the packet

    def __repr__(self) -> str:
        return (f"Segment(v{self.version} {self.src.hex()}:{self.sport} > {self.dst.hex()}:{self.dport} "
                f"seq={self.seq} ack={self.ack} flags={self.flags:#x} payload={self.payload!r})")

    def sack_blocks(self) -> list[tuple[int, int]]:
        """SACK blocks as (left, right) pairs, in option order."""
        return [(left, right) for _, left, right in _sack_positions(self.raw, self.tcp_off, self.tcp_hlen)]


def decode(raw: bytes) -> Segment:
    """Decode an IPv4 or IPv6 packet carrying TCP; raise DecodeError otherwise."""
    n = len(raw)
    if n < 1:
        raise DecodeError("empty packet")
    version = raw[0] >> 4
    if version == 4:
        if n < 20:
            raise DecodeError("short IPv4 header")
        ihl = (raw[0] & 0x0F) * 4
        total = (raw[2] << 8) | raw[3]
        if ihl < 20 or n < ihl or total < ihl:
            raise DecodeError("bad IPv4 header length")
        if raw[9] != IPPROTO_TCP:
            raise DecodeError("not TCP")
        if (raw[6] & 0x3F) or raw[7]:  # MF flag or fragment offset
            raise DecodeError("IPv4 fragment")
        src, dst = raw[12:16], raw[16:20]
    elif version == 6:
        if n < 40:
            raise DecodeError("short IPv6 header")
        ihl = 40
        total = 40 + ((raw[4] << 8) | raw[5])
        if raw[6] != IPPROTO_TCP:
            raise DecodeError("IPv6 next header is not TCP")
        src, dst = raw[8:24], raw[24:40]
    else:
        raise DecodeError(f"IP version {version}")
    have = n if n < total else total
    if have < ihl + 20:
        raise DecodeError("short TCP header")
    sport, dport, seq, ack, off_flags = _TCP_HEAD.unpack_from(raw, ihl)
    thl = (off_flags >> 12) * 4
    if thl < 20 or ihl + thl > have:
        raise DecodeError("bad TCP data offset")
    return Segment(raw, version, src, dst, sport, dport, seq, ack, off_flags & 0x3F, ihl, ihl, thl, total)


def _sack_positions(raw: bytes, tcp_off: int, tcp_hlen: int) -> list[tuple[int, int, int]]:
    """(offset in raw, left, right) for each SACK block; malformed options stop the walk."""
    out: list[tuple[int, int, int]] = []
    i, end = tcp_off + 20, tcp_off + tcp_hlen
    while i < end:
        kind = raw[i]
        if kind == TCPOPT_EOL:
            break
        if kind == TCPOPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            break
        olen = raw[i + 1]
        if olen < 2 or i + olen > end:
            break
        if kind == TCPOPT_SACK:
            for b in range(i + 2, i + olen - 7, 8):
                left, right = struct.unpack_from("!II", raw, b)
                out.append((b, left, right))
        i += olen
    return out


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """RFC 1071 Internet checksum (one's complement of the one's complement sum)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    s: int = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def encode(
    seg: Segment,
    payload: bytes,
    seq: int,
    ack: int,
    map_sack: Callable[[int], int] | None = None,
) -> bytes:
    """Rebuild ``seg`` with ``payload``, ``seq``/``ack`` (and SACK edges passed through
    ``map_sack``), recomputing lengths and checksums."""
    head = bytearray(seg.raw[: seg.tcp_off + seg.tcp_hlen])
    t = seg.tcp_off
    struct.pack_into("!II", head, t + 4, seq & _U32, ack & _U32)
    if map_sack is not None:
        for off, left, right in _sack_positions(seg.raw, t, seg.tcp_hlen):
            struct.pack_into("!II", head, off, map_sack(left) & _U32, map_sack(right) & _U32)
    tcp_len = seg.tcp_hlen + len(payload)
    if seg.version == 4:
        total = seg.ip_hlen + tcp_len
        if total > 0xFFFF:
            raise DecodeError("rewritten packet too large")
        struct.pack_into("!H", head, 2, total)
        struct.pack_into("!H", head, 10, 0)
        struct.pack_into("!H", head, 10, checksum(head[: seg.ip_hlen]))
        pseudo = seg.src + seg.dst + struct.pack("!BBH", 0, IPPROTO_TCP, tcp_len)
    else:
        if tcp_len > 0xFFFF:
            raise DecodeError("rewritten packet too large")
        struct.pack_into("!H", head, 4, tcp_len)
        pseudo = seg.src + seg.dst + struct.pack("!IxxxB", tcp_len, IPPROTO_TCP)
    struct.pack_into("!H", head, t + 16, 0)
    out = head + payload
    struct.pack_into("!H", out, t + 16, checksum(pseudo + bytes(out[t:])))
    return bytes(out)
