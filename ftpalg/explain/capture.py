"""Reading captures: every frame of a pcap or pcapng file, numbered as Wireshark numbers
them, with the IP packet it carries (or None).

The capture reader is a small one of its own (classic pcap, both byte orders, micro- and
nanosecond; pcapng; Ethernet with VLAN tags, Linux cooked v1/v2, raw IP, BSD loopback):
a gateway installed with ``pip install .`` has no scapy, and decoding goes through the
core's own codec anyway. Offline only: nothing here is on the packet path.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO


class CaptureError(Exception):
    """The file is not a capture this reader understands."""


_LINK_ETHERNET, _LINK_NULL, _LINK_RAW, _LINK_SLL, _LINK_SLL2 = 1, 0, 101, 113, 276
_LINK_IPV4, _LINK_IPV6, _LINK_LOOP = 228, 229, 108
_RAW_LINKS = {_LINK_RAW, 12, 14, _LINK_IPV4, _LINK_IPV6}


def _ip_from_link(link: int, data: bytes) -> bytes | None:
    """The IP packet in a frame of link type ``link``, or None (not IP, or unknown link)."""
    if link in _RAW_LINKS:
        return data
    if link == _LINK_ETHERNET:
        off, etype = 14, int.from_bytes(data[12:14], "big") if len(data) >= 14 else 0
        while etype in (0x8100, 0x88A8, 0x9100) and len(data) >= off + 4:  # VLAN tags
            etype = int.from_bytes(data[off + 2 : off + 4], "big")
            off += 4
        return data[off:] if etype in (0x0800, 0x86DD) else None
    if link == _LINK_SLL:
        etype = int.from_bytes(data[14:16], "big") if len(data) >= 16 else 0
        return data[16:] if etype in (0x0800, 0x86DD) else None
    if link == _LINK_SLL2:
        etype = int.from_bytes(data[0:2], "big") if len(data) >= 20 else 0
        return data[20:] if etype in (0x0800, 0x86DD) else None
    if link in (_LINK_NULL, _LINK_LOOP):
        return data[4:] if len(data) > 4 and data[4] >> 4 in (4, 6) else None
    return None


Frame = tuple[int, float, bytes | None]  # (frame number from 1, seconds, IP packet or None)


def read_capture(path: Path) -> list[Frame]:
    """Every frame of a pcap or pcapng file, numbered as Wireshark numbers them."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise CaptureError(f"{path}: not a pcap or pcapng file (too short)")
            if head == b"\x0a\x0d\x0d\x0a":
                return _read_pcapng(f, path)
            return _read_pcap(head, f, path)
    except OSError as e:
        raise CaptureError(f"{path}: {e.strerror or e}") from None
    except struct.error:
        raise CaptureError(f"{path}: truncated capture file") from None


def _read_pcap(magic: bytes, f: BinaryIO, path: Path) -> list[Frame]:
    kinds = {b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
             b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9)}
    if magic not in kinds:
        raise CaptureError(f"{path}: not a pcap or pcapng file (magic {magic.hex()})")
    bo, unit = kinds[magic]
    rest = f.read(20)
    if len(rest) < 20:
        raise CaptureError(f"{path}: truncated pcap header")
    link = struct.unpack(bo + "I", rest[16:20])[0] & 0x0FFFFFFF
    out: list[Frame] = []
    while True:
        rec = f.read(16)
        if not rec:
            return out
        if len(rec) < 16:
            return out  # a capture cut short (tcpdump killed): keep what is whole
        sec, frac, caplen, _ = struct.unpack(bo + "IIII", rec)
        data = f.read(caplen)
        if len(data) < caplen:
            return out
        out.append((len(out) + 1, sec + frac * unit, _ip_from_link(link, data)))


def _read_pcapng(f: BinaryIO, path: Path) -> list[Frame]:
    out: list[Frame] = []
    bo = "<"
    ifaces: list[tuple[int, float]] = []  # (link type, seconds per timestamp unit)
    first = True
    while True:
        head = b"\x0a\x0d\x0d\x0a" if first else f.read(4)
        if len(head) < 4:
            return out
        if first:
            first = False
            blen_raw, magic = f.read(4), f.read(4)
            if magic == b"\x4d\x3c\x2b\x1a":
                bo = "<"
            elif magic == b"\x1a\x2b\x3c\x4d":
                bo = ">"
            else:
                raise CaptureError(f"{path}: bad pcapng byte-order magic")
            blen = struct.unpack(bo + "I", blen_raw)[0]
            body = magic + f.read(blen - 16)
        else:
            blen_raw = f.read(4)
            if len(blen_raw) < 4:
                return out
            blen = struct.unpack(bo + "I", blen_raw)[0]
            if blen < 12:
                raise CaptureError(f"{path}: bad pcapng block length {blen}")
            body = f.read(blen - 12)
        if len(f.read(4)) < 4:
            return out
        btype = struct.unpack(bo + "I", head)[0]
        if btype == 0x0A0D0D0A:  # a new section: its own byte order and interfaces
            if body[:4] == b"\x1a\x2b\x3c\x4d":
                bo = ">"
            elif body[:4] == b"\x4d\x3c\x2b\x1a":
                bo = "<"
            ifaces = []
        elif btype == 1:  # interface description
            link = struct.unpack(bo + "H", body[:2])[0]
            ifaces.append((link, _tsresol(body[8:], bo)))
        elif btype in (6, 2):  # enhanced packet / obsolete packet block
            if btype == 6:
                iface, hi, lo, caplen = struct.unpack(bo + "IIII", body[:16])
                data = body[20 : 20 + caplen]
            else:
                iface, _, hi, lo, caplen = struct.unpack(bo + "HHIII", body[:16])
                data = body[20 : 20 + caplen]
            link, unit = ifaces[iface] if iface < len(ifaces) else (_LINK_ETHERNET, 1e-6)
            out.append((len(out) + 1, ((hi << 32) | lo) * unit, _ip_from_link(link, data)))
        elif btype == 3:  # simple packet block: no timestamp
            link = ifaces[0][0] if ifaces else _LINK_ETHERNET
            out.append((len(out) + 1, 0.0, _ip_from_link(link, body[4:])))


def _tsresol(opts: bytes, bo: str) -> float:
    """The if_tsresol option of an interface description block (default microseconds)."""
    i = 0
    while i + 4 <= len(opts):
        code, n = struct.unpack(bo + "HH", opts[i : i + 4])
        if code == 0:
            break
        if code == 9 and n >= 1:
            v = opts[i + 4]
            return 2.0 ** -(v & 0x7F) if v & 0x80 else 10.0 ** -v
        i += 4 + ((n + 3) & ~3)
    return 1e-6
