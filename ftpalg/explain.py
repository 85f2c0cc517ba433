"""``ftpalg explain CAPTURE``: run the core offline over a capture and say what ftpalg would
rewrite and open, what happened to every data connection, and why a transfer failed.

The capture may be taken on either side of a gateway (or at a client or server). For each
FTP control connection (port 21 or ``--control-port``) the NAT mapping a gateway's
conntrack would report is inferred from the capture:

- client private, server public: taken on the inside of a client-NAT gateway; its public
  address is ``--public`` or unknown (shown as ``<public>``);
- a PORT/EPRT/LPRT naming a private address while the client appears public: the client is
  behind NAT, taken outside it (the client's real address is the announced one);
- server private, client public: taken on the inside of a server-DNAT gateway (its public
  address: ``--public`` or unknown);
- a 227/228 naming a private address while the server appears public: the server is behind
  a DNAT gateway, taken outside it (the server's real address is the announced one).

The packets are then put back as a gateway's hook would see them (client side addresses for
the client's packets, server side ones for the server's) and go through the real
``Alg.handle`` with an offline conntrack and a pinhole backend that only records: what it
opens, rewrites and refuses is the core's own decision, counters and log. Lines, replies,
data connections (SYN, SYN/ACK, RST, bytes) and ICMP errors are read from the capture
beside it and matched to each announcement by port and time.

The capture reader is a small one of its own (classic pcap, both byte orders, micro- and
nanosecond; pcapng; Ethernet with VLAN tags, Linux cooked v1/v2, raw IP, BSD loopback):
a gateway installed with ``pip install .`` has no scapy, and decoding goes through the
core's own codec anyway. Offline only: nothing here is on the packet path.
"""

from __future__ import annotations

import argparse
import html
import ipaddress
import json
import logging
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .core import ftp, policy
from .core.packet import DecodeError, Segment, TcpFlags, decode
from .core.policy import Limits, Mapping, addr_text
from .core.seqadj import MASK, KernelAdj, diff
from .core.table import Alg, FlowKey, Pinhole

# ---- reading captures --------------------------------------------------------------------------


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


# ---- addresses ------------------------------------------------------------------------------

_PRIVATE = [ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "fc00::/7", "fe80::/10")]
PLACEHOLDER = {4: "0.0.0.0", 6: "100::1"}  # stands for a public address the capture does not show
UNKNOWN = "<public>"


def is_private(addr: str) -> bool:
    """RFC 1918, shared (RFC 6598), link-local and ULA addresses: not reachable from the
    internet. The documentation ranges (the lab's "public" networks) count as public."""
    ip = ipaddress.ip_address(addr)
    return any(ip in n for n in _PRIVATE if n.version == ip.version)


def hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


# ---- connections in the capture -------------------------------------------------------------


@dataclass
class Line:
    frame: int
    t: float
    d: int  # 0 client -> server (command), 1 server -> client (reply)
    text: bytes


@dataclass
class DataConn:
    """A TCP connection that is not a control connection."""

    a: str  # who sent the SYN (or the first packet seen)
    aport: int
    b: str
    bport: int
    first_frame: int
    t0: float
    t1: float
    syns: int = 0
    synack: bool = False
    rst_by: str | None = None  # "initiator" / "responder"
    fin: bool = False
    bytes_ab: int = 0
    bytes_ba: int = 0
    frames: list[int] = field(default_factory=list)
    icmp: str | None = None  # an ICMP error about it
    next_seq: list[int | None] = field(default_factory=lambda: [None, None])
    matched: bool = False

    @property
    def status(self) -> str:
        if self.synack and self.rst_by is None:
            return "ok"
        if self.synack:
            return "reset"
        if self.rst_by == "responder":
            return "refused"
        if self.icmp:
            return "unreachable"
        return "unanswered" if self.syns else "partial"

    def describe(self) -> str:
        who = f"{hostport(self.a, self.aport)} -> {hostport(self.b, self.bport)}"
        if self.status == "ok":
            return f"{who}: connected (SYN, SYN/ACK), {self.bytes_ab + self.bytes_ba} bytes"
        if self.status == "reset":
            return f"{who}: connected, then reset by the {self.rst_by}, {self.bytes_ab + self.bytes_ba} bytes"
        if self.status == "refused":
            return f"{who}: SYN answered by RST (refused: nothing listens or a firewall rejects it)"
        if self.status == "unreachable":
            return f"{who}: SYN answered by {self.icmp}"
        if self.status == "unanswered":
            return f"{who}: SYN not answered ({self.syns} sent: dropped on the way)"
        return f"{who}: seen mid-connection"

    def as_dict(self) -> dict[str, Any]:
        return {"from": hostport(self.a, self.aport), "to": hostport(self.b, self.bport), "status": self.status,
                "first_packet": self.first_frame, "syns": self.syns, "synack": self.synack, "rst_by": self.rst_by,
                "bytes": self.bytes_ab + self.bytes_ba, "icmp": self.icmp, "description": self.describe()}


@dataclass
class Announcement:
    line: Line
    hp: ftp.HostPort
    cmd_index: int  # the PORT itself, or the PASV/EPSV/LPSV the reply answers
    action: str = "nothing"  # rewrite / open / refused / unsolicited / malformed / ...
    detail: str = ""
    rewritten: bytes | None = None
    pinhole: Pinhole | None = None
    reply: tuple[int, str] | None = None  # the server's reply to a PORT/EPRT/LPRT
    transfer: tuple[str, int | None, str] | None = None  # (command, final code, text)
    data: list[DataConn] = field(default_factory=list)
    ok: bool = False
    diagnosis: str = ""
    problems: list[str] = field(default_factory=list)  # tags: private_address, no_data_connection, ...

    @property
    def active(self) -> bool:
        return not self.hp.form.is_reply


@dataclass
class Session:
    client: str
    cport: int
    server: str
    sport: int
    frames: list[int] = field(default_factory=list)
    t0: float = 0.0
    t1: float = 0.0
    lines: list[Line] = field(default_factory=list)
    user: str | None = None
    mapping: Mapping | None = None
    where: str = ""
    public_unknown: bool = False
    announcements: list[Announcement] = field(default_factory=list)
    transfers: list[tuple[Line, int | None, str]] = field(default_factory=list)  # command, final code, text
    encrypted_at: int | None = None
    counters: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    diagnosis: list[str] = field(default_factory=list)
    verdict: str = "ok"

    @property
    def key(self) -> FlowKey:
        return (_packed(self.client), self.cport, _packed(self.server), self.sport)


def _tcp_conns(frames: list[Frame], control_ports: frozenset[int]
               ) -> tuple[list[Session], list[DataConn], list[tuple[int, float, Segment]]]:
    """Control sessions, data connections and every TCP segment, from the frames."""
    sessions: dict[tuple[str, int, str, int], Session] = {}
    data: dict[tuple[str, int, str, int], DataConn] = {}
    segs: list[tuple[int, float, Segment]] = []
    icmps: list[tuple[str, tuple[str, int, str, int]]] = []
    for no, t, raw in frames:
        if raw is None:
            continue
        icmp = _icmp_error(raw)
        if icmp is not None:
            icmps.append(icmp)
            continue
        try:
            seg = decode(raw)
        except DecodeError:
            continue
        segs.append((no, t, seg))
        src, dst = addr_text(seg.src), addr_text(seg.dst)
        fwd = (src, seg.sport, dst, seg.dport)
        rev = (dst, seg.dport, src, seg.sport)
        if fwd in sessions or rev in sessions:
            s = sessions[fwd] if fwd in sessions else sessions[rev]
            s.frames.append(no)
            s.t1 = t
            continue
        if seg.dport in control_ports or seg.sport in control_ports:
            client = fwd if seg.dport in control_ports else rev
            s = Session(*client, t0=t, t1=t)
            s.frames.append(no)
            sessions[client] = s
            continue
        c = data.get(fwd) or data.get(rev)
        flags = seg.flags
        if c is None or (flags & TcpFlags.SYN and not flags & TcpFlags.ACK and fwd in data and c.synack):
            init = rev if flags & TcpFlags.SYN and flags & TcpFlags.ACK else fwd
            c = DataConn(*init, first_frame=no, t0=t, t1=t)
            data[init] = c
            data.pop((init[2], init[3], init[0], init[1]), None)
        key_dir = 0 if (src, seg.sport) == (c.a, c.aport) else 1
        c.frames.append(no)
        c.t1 = t
        if flags & TcpFlags.SYN:
            if flags & TcpFlags.ACK:
                c.synack = True
            else:
                c.syns += 1
            c.next_seq[key_dir] = (seg.seq + 1) & MASK
        if flags & TcpFlags.RST:
            c.rst_by = c.rst_by or ("initiator" if key_dir == 0 else "responder")
        if flags & TcpFlags.FIN:
            c.fin = True
        n = len(seg.payload)
        if n:
            nxt = c.next_seq[key_dir]  # count new bytes only (not retransmissions)
            new = n if nxt is None else min(n, max(0, diff((seg.seq + n) & MASK, nxt)))
            if new:
                c.next_seq[key_dir] = (seg.seq + n) & MASK
            if key_dir == 0:
                c.bytes_ab += new
            else:
                c.bytes_ba += new
    conns = list(data.values())
    for what, (a, ap, b, bp) in icmps:
        for c in conns:
            if (c.a, c.aport, c.b, c.bport) == (a, ap, b, bp) and c.icmp is None:
                c.icmp = what
    return list(sessions.values()), conns, segs


_ICMP4 = {0: "network unreachable", 1: "host unreachable", 3: "port unreachable", 9: "network prohibited",
          10: "host prohibited", 13: "administratively prohibited"}
_ICMP6 = {0: "no route", 1: "administratively prohibited", 3: "address unreachable", 4: "port unreachable"}


def _icmp_error(raw: bytes) -> tuple[str, tuple[str, int, str, int]] | None:
    """An ICMP/ICMPv6 destination-unreachable about a TCP packet: (what, its 4-tuple)."""
    if raw[:1] and raw[0] >> 4 == 4 and len(raw) >= 20 and raw[9] == 1:
        ihl = (raw[0] & 0x0F) * 4
        icmp = raw[ihl:]
        if len(icmp) < 8 + 20 or icmp[0] != 3:
            return None
        inner = icmp[8:]
        ihl2 = (inner[0] & 0x0F) * 4
        if inner[9] != 6 or len(inner) < ihl2 + 4:
            return None
        sp, dp = struct.unpack_from("!HH", inner, ihl2)
        what = "ICMP " + _ICMP4.get(icmp[1], f"unreachable (code {icmp[1]})")
        return what, (addr_text(inner[12:16]), sp, addr_text(inner[16:20]), dp)
    if raw[:1] and raw[0] >> 4 == 6 and len(raw) >= 40 and raw[6] == 58:
        icmp = raw[40:]
        if len(icmp) < 8 + 44 or icmp[0] != 1:
            return None
        inner = icmp[8:]
        if inner[6] != 6:
            return None
        sp, dp = struct.unpack_from("!HH", inner, 40)
        what = "ICMPv6 " + _ICMP6.get(icmp[1], f"unreachable (code {icmp[1]})")
        return what, (addr_text(inner[8:24]), sp, addr_text(inner[24:40]), dp)
    return None


def _lines(s: Session, segs: list[tuple[int, float, Segment]]) -> None:
    """The session's commands and replies, in stream order per direction (retransmissions
    skipped, lines joined across segments); stops reading at AUTH TLS's 234."""
    nxt: list[int | None] = [None, None]
    buf = [b"", b""]
    start = [0, 0]
    pending: list[bytes] = []
    multi = 0
    for no, t, seg in segs:
        src = addr_text(seg.src)
        if (src, seg.sport, addr_text(seg.dst), seg.dport) == (s.client, s.cport, s.server, s.sport):
            d = 0
        elif (src, seg.sport) == (s.server, s.sport) and (addr_text(seg.dst), seg.dport) == (s.client, s.cport):
            d = 1
        else:
            continue
        if seg.flags & TcpFlags.SYN:
            nxt[d] = (seg.seq + 1) & MASK
            continue
        payload = seg.payload
        if not payload or s.encrypted_at is not None:
            continue
        if nxt[d] is None:
            nxt[d] = seg.seq
        rel = diff(seg.seq, nxt[d] or 0)
        if rel + len(payload) <= 0:
            continue  # a retransmission
        if rel > 0:
            buf[d] = b""  # a gap: lines before it are lost
        payload = payload[max(0, -rel):]
        nxt[d] = (seg.seq + len(seg.payload)) & MASK
        if not buf[d]:
            start[d] = no
        buf[d] += payload
        while b"\n" in buf[d]:
            line, buf[d] = buf[d].split(b"\n", 1)
            s.lines.append(Line(no, t, d, line + b"\n"))
            if d == 0:
                pending.append(ftp.command_verb(line))
                continue
            r = ftp.parse_reply(line)
            if multi:
                if r is not None and r.code == multi and r.final:
                    multi = 0
                    if pending:
                        pending.pop(0)
                continue
            if r is None:
                continue
            if not r.final:
                multi = r.code
                continue
            if r.code >= 200 and pending:
                verb = pending.pop(0)
                if verb == b"AUTH" and r.code == 234:
                    s.encrypted_at = no
                    break


# ---- the core, offline -----------------------------------------------------------------------


class OfflineNat:
    """Conntrack as the capture implies it: one reply tuple per control connection, and a
    sequence adjustment that only counts (nothing is sent anywhere)."""

    def __init__(self) -> None:
        self.table: dict[FlowKey, FlowKey] = {}
        self.adj: dict[tuple[FlowKey, int], KernelAdj] = {}

    def reply_tuple(self, key: FlowKey) -> FlowKey | None:
        return self.table.get(key)

    def seq_adjust(self, key: FlowKey, direction: int, seq: int, delta: int) -> KernelAdj:
        k = self.adj.get((key, direction), KernelAdj()).add(seq, delta)
        self.adj[(key, direction)] = k
        return k


class RecordingPinholes:
    """A pinhole backend that opens nothing and remembers what it was asked."""

    def __init__(self) -> None:
        self.opened: list[Pinhole] = []
        self.closed: list[Pinhole] = []

    def open(self, ph: Pinhole) -> None:
        self.opened.append(ph)

    def close(self, ph: Pinhole) -> None:
        self.closed.append(ph)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class FrameResult:
    opened: list[Pinhole]
    counters: Counter[str]
    messages: list[str]
    changed: bool


def _announced(s: Session) -> tuple[list[str], list[str]]:
    """Addresses the session's PORT/EPRT/LPRT and 227/228 lines name."""
    active, passive = [], []
    for ln in s.lines:
        try:
            if ln.d == 0:
                hp = ftp.parse_hostport(ln.text)
                if hp is not None and hp.addr:
                    active.append(hp.addr)
            else:
                r = ftp.parse_reply(ln.text)
                if r is not None and r.code in (227, 228):
                    hp = ftp.parse_passive_reply(ln.text, r.code)
                    if hp is not None and hp.addr:
                        passive.append(hp.addr)
        except ftp.ParseError:
            continue
    return active, passive


def infer_mapping(s: Session, public: str | None) -> None:
    """The gateway's view of the control connection (``s.mapping``) and where the capture
    was taken (``s.where``), from its addresses and what it announces."""
    c, sv = s.client, s.server
    fam = 6 if ":" in c else 4
    if public is not None and (6 if ":" in public else 4) != fam:
        public = None
    active, passive = _announced(s)
    client, client_seen, server, pub = c, c, sv, sv
    where = []
    if is_private(c) and not is_private(sv):
        client_seen = public or PLACEHOLDER[fam]
        s.public_unknown = public is None
        where.append(f"the client {c} is private and the server {sv} public: captured on the client's side of a "
                     f"NAT gateway (its public address: {public or 'unknown, give it with --public ADDR'})")
    elif not is_private(c):
        other = [a for a in active if a != c and is_private(a) and (6 if ":" in a else 4) == fam]
        if other:
            client = other[0]
            where.append(f"the client appears as {c} but announces {client}: it is behind a NAT gateway, "
                         "captured outside it")
    if is_private(sv) and not is_private(c):
        pub = public or PLACEHOLDER[fam]
        s.public_unknown = s.public_unknown or public is None
        where.append(f"the server {sv} is private and the client {c} public: captured on the server's side of a "
                     f"DNAT gateway (its public address: {public or 'unknown, give it with --public ADDR'})")
    elif not is_private(sv):
        other = [a for a in passive if a != sv and is_private(a) and (6 if ":" in a else 4) == fam]
        if other:
            server = other[0]
            where.append(f"the client connects to {sv} but the server announces {server}: the server is behind a "
                         f"DNAT gateway ({hostport(sv, s.sport)} -> {hostport(server, s.sport)}), captured outside it")
    if not where:
        where.append("no address translation visible: client and server addresses as captured")
    s.mapping = Mapping(client, pub, server, client_seen)
    s.where = "; ".join(where)


def _hook_view(seg: Segment, s: Session, d: int) -> bytes:
    """The packet with the addresses a gateway's hook (before NAT) sees it with."""
    m = s.mapping
    assert m is not None
    src, dst = (m.client, m.public) if d == 0 else (m.server, m.client_seen)
    raw = bytearray(seg.raw)
    n = 4 if seg.version == 4 else 16
    at = 12 if seg.version == 4 else 8
    raw[at : at + n] = _packed(src)
    raw[at + n : at + 2 * n] = _packed(dst)
    return bytes(raw)


def run_core(sessions: list[Session], segs: list[tuple[int, float, Segment]], limits: Limits,
             control_ports: frozenset[int], pinhole_timeout: float) -> dict[int, FrameResult]:
    """Feed every control segment, as the gateway's hook would see it, to one ``Alg``;
    return what it did per frame (pinholes opened, counters, log lines, payload changed)."""
    nat = OfflineNat()
    holes = RecordingPinholes()
    ports = frozenset({*control_ports, *(s.sport for s in sessions)})
    alg = Alg(nat, holes, ports, pinhole_timeout, limits=limits)
    by_tuple: dict[tuple[str, int, str, int], tuple[Session, int]] = {}
    for s in sessions:
        m = s.mapping
        assert m is not None
        nat.table[(_packed(m.client), s.cport, _packed(m.public), s.sport)] = (
            _packed(m.server), s.sport, _packed(m.client_seen), s.cport)
        by_tuple[(s.client, s.cport, s.server, s.sport)] = (s, 0)
        by_tuple[(s.server, s.sport, s.client, s.cport)] = (s, 1)
    rec = _Records()
    logger = logging.getLogger("ftpalg")
    logger.addHandler(rec)
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    results: dict[int, FrameResult] = {}
    try:
        for no, t, seg in segs:
            hit = by_tuple.get((addr_text(seg.src), seg.sport, addr_text(seg.dst), seg.dport))
            if hit is None:
                continue
            s, d = hit
            alg.expire_held(t)
            alg.tick(t)
            before = Counter(alg.counters)
            n_open = len(holes.opened)
            rec.messages = []
            out = alg.handle(_hook_view(seg, s, d), t, token=no)
            released = alg.take_released()
            changed = isinstance(out, bytes) and out != b"" or any(x for _, x in released)
            delta = Counter(alg.counters)
            delta.subtract(before)
            delta = +delta
            results[no] = FrameResult(holes.opened[n_open:], delta, rec.messages, changed)
            s.counters.update(delta)
        alg.release_all()
        alg.take_released()
        alg.shutdown()
    finally:
        logger.removeHandler(rec)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
    return results


# ---- matching and diagnosis -----------------------------------------------------------------

_PROBLEMS = ("refused", "unsolicited", "malformed", "partial_line", "no_nat_mapping", "no_free_port",
             "pinhole_failed", "no_seq_adjust", "pinhole_cap", "client_pinhole_cap", "gap")


def _show(text: str, s: Session) -> str:
    """``text`` with the placeholder of an unknown public address shown as <public>."""
    if not s.public_unknown:
        return text
    for fam, ph in PLACEHOLDER.items():
        text = text.replace(ph, UNKNOWN)
        if fam == 4:
            text = text.replace("0,0,0,0", UNKNOWN)
    return text


def _line_text(b: bytes) -> str:
    return b.decode("latin-1").rstrip("\r\n")


def analyse(s: Session, results: dict[int, FrameResult], data: list[DataConn], limits: Limits) -> None:
    """Announcements with the core's decision, the replies to them, the data connections
    they led to, and a diagnosis per failed transfer."""
    m = s.mapping
    assert m is not None
    cmds: list[tuple[Line, int]] = []  # pending commands with their index
    count = 0
    last_ann: Announcement | None = None
    multi: tuple[int, list[Line]] | None = None
    for ln in s.lines:
        if ln.d == 0:
            count += 1
            cmds.append((ln, count))
            verb = ftp.command_verb(ln.text)
            if verb == b"USER" and s.user is None:
                s.user = _line_text(ln.text)[5:].strip() or None
            if verb in (b"PORT", b"EPRT", b"LPRT"):
                try:
                    hp = ftp.parse_hostport(ln.text)
                except ftp.ParseError as e:
                    s.notes.append(f"packet {ln.frame}: {_line_text(ln.text)!r} is malformed ({e}): ftpalg "
                                   "opens nothing for it")
                    continue
                if hp is not None:
                    last_ann = Announcement(ln, hp, count)
                    s.announcements.append(last_ann)
                    _core_decision(last_ann, s, results.get(ln.frame), limits)
            continue
        r = ftp.parse_reply(ln.text)
        if multi is not None:
            multi[1].append(ln)
            if not (r is not None and r.code == multi[0] and r.final):
                continue
            code, body = multi[0], multi[1]
            multi = None
        elif r is None:
            continue
        elif not r.final:
            multi = (r.code, [ln])
            continue
        else:
            code, body = r.code, [ln]
        if code in (227, 228, 229):
            asked = cmds[0] if cmds else None
            for b in body:
                try:
                    hp = ftp.parse_passive_reply(b.text, code)
                except ftp.ParseError as e:
                    s.notes.append(f"packet {b.frame}: {_line_text(b.text)!r} is malformed ({e}): ftpalg "
                                   "opens nothing for it")
                    break
                if hp is not None:
                    last_ann = Announcement(b, hp, asked[1] if asked else 0)
                    s.announcements.append(last_ann)
                    _core_decision(last_ann, s, results.get(b.frame), limits)
                    break
        if code < 200 or not cmds:
            if code < 200 and cmds and ftp.command_verb(cmds[0][0].text) in _TRANSFER and last_ann is not None:
                pass
            continue
        cmd, n = cmds.pop(0)
        verb = ftp.command_verb(cmd.text)
        text = " ".join(_line_text(b.text) for b in body)
        if verb in (b"PORT", b"EPRT", b"LPRT"):
            for a in s.announcements:
                if a.cmd_index == n and a.active:
                    a.reply = (code, text)
        if verb in _TRANSFER:
            s.transfers.append((cmd, code, text))
            if last_ann is not None and last_ann.transfer is None and last_ann.cmd_index < n:
                last_ann.transfer = (_line_text(cmd.text), code, text)
    for cmd, n in cmds:  # never answered
        if ftp.command_verb(cmd.text) in _TRANSFER:
            s.transfers.append((cmd, None, ""))
            if last_ann is not None and last_ann.transfer is None and last_ann.cmd_index < n:
                last_ann.transfer = (_line_text(cmd.text), None, "")
    _match_data(s, data)
    for a in s.announcements:
        _diagnose(a, s)
    _session_verdict(s, data)


_TRANSFER = frozenset({b"RETR", b"STOR", b"STOU", b"APPE", b"LIST", b"NLST", b"MLSD"})


def _core_decision(a: Announcement, s: Session, res: FrameResult | None, limits: Limits) -> None:
    """What the core did with the announcement's line (the frame that completed it)."""
    m = s.mapping
    assert m is not None
    if res is None:
        a.action, a.detail = "unseen", "the core did not see this line"
        return
    if res.opened:
        ph = res.opened[-1]
        a.pinhole = ph
        addr = ph.public if a.hp.addr is not None else None
        new = ftp.rewrite_line(a.line.text, a.hp, addr, ph.public_port)
        if res.counters.get("rewrites") and new != a.line.text:
            a.action, a.rewritten = "rewrite", new
            a.detail = f"rewrite to {_show(hostport(ph.public, ph.public_port), s)} and open a pinhole"
        else:
            a.action = "open"
            a.detail = "leave it unchanged and open a pinhole"
        a.detail += f": {_show(_pinhole_text(ph), s)}"
        return
    for reason in _PROBLEMS:
        if res.counters.get(reason):
            a.action = reason
            if reason == "refused":
                a.detail = policy.refuse_reason(a.hp, m, limits) or "refused"
            else:
                msg = next((x for x in res.messages if x.startswith(reason)), "")
                a.detail = msg.split(": ", 1)[1] if ": " in msg else reason
            return
    if res.counters.get("encrypted"):
        a.action, a.detail = "encrypted", "the control connection is encrypted"
        return
    a.action, a.detail = "nothing", "no pinhole, no rewrite"


def _pinhole_text(ph: Pinhole) -> str:
    s = f"{ph.peer} (any port) may connect to {hostport(ph.public, ph.public_port)}"
    if ph.dnat:
        s += f", sent on to {hostport(ph.inside, ph.inside_port)}"
    if ph.snat:
        s += f", leaving from {ph.snat}"
    return s + ", once"


def _match_data(s: Session, data: list[DataConn]) -> None:
    """Data connections of each announcement: to its port (or the port it would be
    rewritten to), from the right side, after it and before the next one."""
    m = s.mapping
    assert m is not None
    anns = s.announcements
    ends = [a.line.t for a in anns[1:]] + [s.t1 + 5.0] if anns else []
    client_side = {s.client, m.client, m.client_seen}
    server_side = {s.server, m.server, m.public}
    for a, end in zip(anns, ends, strict=True):
        ports = {a.hp.port} | ({a.pinhole.public_port} if a.pinhole else set())
        for c in data:
            if c.matched or c.t0 < a.line.t - 0.001 or c.t0 > end or c.bport not in ports:
                continue
            if a.active and not (c.a in server_side or c.b in client_side or c.b == a.hp.addr):
                continue
            if not a.active and not (c.a in client_side or c.b in server_side or c.b == a.hp.addr):
                continue
            c.matched = True
            a.data.append(c)


def _short_fix(a: Announcement, s: Session) -> str:
    """What ftpalg would do, in a few words, for a diagnosis."""
    ph = a.pinhole
    if ph is None:
        if "--min-port" in a.detail:
            return f"port {a.hp.port} refused by policy (--min-port): ftpalg opens nothing for it ({a.detail})"
        return f"ftpalg would not help: {a.action} ({a.detail})"
    to = _show(hostport(ph.public, ph.public_port), s)
    if a.action == "rewrite":
        return f"ftpalg would rewrite it to {to} and open a pinhole for {ph.peer}"
    return f"ftpalg would open a pinhole for {ph.peer} to {to}" + (
        f", sent on to {hostport(ph.inside, ph.inside_port)}" if ph.dnat else "")


def _diagnose(a: Announcement, s: Session) -> None:
    m = s.mapping
    assert m is not None
    hp = a.hp
    name = "227" if hp.form is ftp.Form.PASV else hp.form.value
    what = f"{name} names {hostport(hp.addr, hp.port) if hp.addr else f'port {hp.port}'}"
    ok_data = [c for c in a.data if c.status == "ok"]
    tr = a.transfer
    tr_ok = tr is not None and tr[1] is not None and 200 <= tr[1] < 300
    refused_by_server = a.active and a.reply is not None and a.reply[0] >= 400
    a.ok = bool(ok_data) and (tr is None or tr_ok) and not refused_by_server
    private = hp.addr is not None and is_private(hp.addr)
    nat = m.client != m.client_seen if a.active else m.public != m.server
    if a.ok:
        extra = ""
        if private and nat:
            extra = " (the address is private: a gateway translated it and let the connection through, as an " \
                    "FTP ALG such as ftpalg does)"
        a.diagnosis = f"{what}: the data connection worked{extra}" + (f", {tr[0]} answered {tr[1]}" if tr else "")
        return
    problem = []
    tags = a.problems
    if private:
        tags.append("private_address")
    if a.action not in ("rewrite", "open"):
        tags.append("min_port" if "--min-port" in a.detail else f"ftpalg_{a.action}")
    if refused_by_server:
        tags.append("server_refused_announcement")
    if a.active:
        if private and hp.addr != s.client:  # captured outside the client's gateway
            problem.append(f"{what}, a private address: the server ({s.server}) cannot reach it")
        elif private and nat:
            problem.append(f"{what}, a private address: the server ({m.server}) cannot reach it (it sees the "
                           f"client as {_show(m.client_seen, s)})")
        else:
            problem.append(what)
        if refused_by_server:
            problem.append(f"the server refused it ({a.reply[1] if a.reply else ''})")
    else:
        if private and hp.addr != s.server and any(c.b != hp.addr for c in a.data):
            problem.append(f"{what} (private): the client ({s.client}) ignored that unreachable address and "
                           "connected to the control connection's address instead")
        elif private and hp.addr != s.server:  # captured outside the server's gateway
            problem.append(f"{what} (private): the client ({s.client}) connects to an unreachable address")
        elif private and nat:
            problem.append(f"{what} (private): a client outside cannot reach it (it knows the server as "
                           f"{_show(m.public, s)})")
        elif nat and hp.addr is None:
            problem.append(f"{what} of the server behind the gateway ({m.server})" + (
                "" if a.data else f": the gateway forwards only the control port, not {_show(m.public, s)}:{hp.port}"))
        else:
            problem.append(what)
    for c in a.data:
        why = c.describe()
        if c.status == "refused" and not a.active and nat and c.b == m.public:
            why += f": the gateway does not forward port {c.bport} to the server ({m.server})"
        elif c.status == "refused" and a.active and nat and c.b == m.client_seen:
            why += f": the gateway does not forward port {c.bport} to the client ({m.client})"
        elif c.status in ("unanswered", "unreachable"):
            why += ": the address is unreachable or a firewall drops it"
        problem.append(f"data connection {why}")
        tags.append(f"data_{c.status}")
    if not a.data and not refused_by_server:
        tags.append("no_data_connection")
        behind = (s.client != m.client_seen or s.client == m.client) if a.active else s.server == m.server
        if a.active:
            problem.append("no data connection from the server seen in this capture" if behind else
                           "no data connection from the server reached this side of the gateway")
        elif private and hp.addr != s.server:
            problem.append("no data connection attempt seen in this capture (data SYN never sent: the client's "
                           "connect failed before it left, e.g. 'Network is unreachable', or went elsewhere)")
        elif nat and s.server == m.server:  # captured between the gateway and the server
            problem.append("no data connection reached this side of the gateway")
        else:
            problem.append("no data connection attempt seen in this capture")
    if tr is not None:
        if tr[1] is None:
            problem.append(f"{tr[0]} got no final reply in the capture")
        elif tr[1] == 425:
            problem.append(f"server answered {tr[2]}")
            tags.append("reply_425")
        elif not tr_ok:
            problem.append(f"{tr[0]} answered {tr[2]}")
    gw = "the gateway needs an FTP ALG: " if a.pinhole is not None and (private or nat or a.data) else ""
    a.diagnosis = "; ".join(problem) + f" — {gw}{_short_fix(a, s)}"


def _session_verdict(s: Session, data: list[DataConn]) -> None:
    failed = [a for a in s.announcements if not a.ok]
    if s.encrypted_at is not None:
        s.verdict = "encrypted"
        s.diagnosis.append(f"AUTH TLS: control channel encrypted after packet {s.encrypted_at} — nothing can be said "
                           "about transfers (ftpalg cannot read or rewrite an encrypted PORT/227/229 either: through "
                           "NAT, FTPS needs the server's passive range forwarded and its public address configured)")
    for a in failed:
        s.diagnosis.append(a.diagnosis)
    bad_transfers = [t for t in s.transfers if t[1] is None or not 200 <= t[1] < 300]
    if failed or (bad_transfers and s.encrypted_at is None):
        s.verdict = "failed"
    if s.encrypted_at is None and not s.announcements and bad_transfers:
        s.diagnosis.append("transfers failed without any PORT/EPRT/LPRT/227/228/229 in the capture")
    if s.verdict == "ok":
        n = sum(1 for a in s.announcements if a.ok)
        s.diagnosis.append(f"nothing wrong: {n} data connection{'s' if n != 1 else ''} worked"
                           if n else "nothing wrong (no transfer in this session)")


# ---- the whole capture ------------------------------------------------------------------------


@dataclass
class Report:
    path: str
    frames: int
    sessions: list[Session]
    data: list[DataConn]

    @property
    def failed(self) -> bool:
        return any(s.verdict == "failed" for s in self.sessions)


class ExplainError(Exception):
    """A capture that cannot be explained (not a capture, no FTP control connection)."""


def explain(path: Path, public: str | None = None, control_ports: frozenset[int] = frozenset({21}),
            limits: Limits = policy.DEFAULT_LIMITS, pinhole_timeout: float = 120.0) -> Report:
    try:
        frames = read_capture(path)
    except CaptureError as e:
        raise ExplainError(str(e)) from None
    if not frames:
        raise ExplainError(f"{path}: the capture holds no packets")
    sessions, data, segs = _tcp_conns(frames, control_ports)
    if not sessions:
        ports = ",".join(map(str, sorted(control_ports)))
        raise ExplainError(f"{path}: no FTP control connection found (TCP port {ports}; another port: "
                           "--control-port)")
    for s in sessions:
        _lines(s, segs)
        infer_mapping(s, public)
    results = run_core(sessions, segs, limits, control_ports, pinhole_timeout)
    for s in sessions:
        analyse(s, results, data, limits)
    return Report(str(path), len(frames), sessions, data)


# ---- output --------------------------------------------------------------------------------------


def _rel(t: float, t0: float) -> str:
    return f"{t - t0:7.3f}s"


def text_report(r: Report) -> str:
    out: list[str] = []
    t0 = min([s.t0 for s in r.sessions] + [c.t0 for c in r.data])
    out.append(f"{r.path}: {r.frames} packets, {len(r.sessions)} FTP control connection"
               f"{'s' if len(r.sessions) != 1 else ''}, {len(r.data)} other TCP connection"
               f"{'s' if len(r.data) != 1 else ''}")
    for i, s in enumerate(r.sessions, 1):
        m = s.mapping
        assert m is not None
        out.append("")
        out.append(f"session {i}: {hostport(s.client, s.cport)} -> {hostport(s.server, s.sport)}"
                   f"  user {s.user or '-'}  [{s.verdict.upper()}]")
        out.append(f"  where: {s.where}")
        out.append(f"  at the gateway: client {m.client} connects to {_show(m.public, s)}"
                   + (f" (sent on to the server {m.server})" if m.server != m.public else "")
                   + f"; the server sees it as {_show(m.client_seen, s)}")
        for a in s.announcements:
            out.append(f"  {_rel(a.line.t, t0)} packet {a.line.frame}: {_line_text(a.line.text)}")
            out.append(f"      ftpalg: {_show(a.detail, s)}")
            if a.rewritten is not None:
                out.append(f"      rewritten: {_show(_line_text(a.rewritten), s)}")
            if a.reply is not None:
                out.append(f"      server: {a.reply[1]}")
            for c in a.data:
                out.append(f"      data: {c.describe()}")
            if a.transfer is not None:
                out.append(f"      {a.transfer[0]}: {a.transfer[2] or 'no final reply'}")
            out.append("      => ok" if a.ok else f"      => FAILED ({', '.join(a.problems) or 'see below'})")
        for note in s.notes:
            out.append(f"  note: {note}")
        if s.encrypted_at is not None:
            out.append(f"  packet {s.encrypted_at}: AUTH TLS accepted (234), the rest is encrypted")
        core = " ".join(f"{k}={v}" for k, v in sorted(s.counters.items()) if k != "packets")
        out.append(f"  core counters: {core or 'none'}")
        out.append("  diagnosis:")
        out.extend(f"    - {d}" for d in s.diagnosis)
    unmatched = [c for c in r.data if not c.matched]
    if unmatched:
        out.append("")
        out.append("TCP connections not matched to an announcement:")
        out.extend(f"  {_rel(c.t0, t0)} packet {c.first_frame}: {c.describe()}" for c in unmatched)
    return "\n".join(out) + "\n"


def json_report(r: Report) -> dict[str, Any]:
    sessions = []
    for s in r.sessions:
        m = s.mapping
        assert m is not None
        sessions.append({
            "client": hostport(s.client, s.cport), "server": hostport(s.server, s.sport), "user": s.user,
            "verdict": s.verdict, "where": s.where,
            "mapping": {"client": m.client, "public": None if m.public in PLACEHOLDER.values() else m.public,
                        "server": m.server,
                        "client_seen": None if m.client_seen in PLACEHOLDER.values() else m.client_seen},
            "encrypted_after_packet": s.encrypted_at,
            "announcements": [{
                "packet": a.line.frame, "time": a.line.t, "line": _line_text(a.line.text), "form": a.hp.form.name,
                "addr": a.hp.addr, "port": a.hp.port, "private": a.hp.addr is not None and is_private(a.hp.addr),
                "ftpalg": {"action": a.action, "detail": _show(a.detail, s),
                           "rewritten": None if a.rewritten is None else _show(_line_text(a.rewritten), s),
                           "pinhole": None if a.pinhole is None else _show(_pinhole_text(a.pinhole), s)},
                "server_reply": None if a.reply is None else {"code": a.reply[0], "text": a.reply[1]},
                "transfer": None if a.transfer is None else {"command": a.transfer[0], "code": a.transfer[1],
                                                             "text": a.transfer[2]},
                "data_connections": [c.as_dict() for c in a.data],
                "ok": a.ok, "problems": a.problems, "diagnosis": a.diagnosis,
            } for a in s.announcements],
            "transfers": [{"command": _line_text(c.text), "packet": c.frame, "code": code, "text": text}
                          for c, code, text in s.transfers],
            "core_counters": dict(sorted(s.counters.items())),
            "notes": s.notes, "diagnosis": s.diagnosis,
        })
    return {"capture": r.path, "packets": r.frames, "failed": r.failed, "sessions": sessions,
            "unmatched_connections": [c.as_dict() for c in r.data if not c.matched]}


# ---- the timeline picture ------------------------------------------------------------------------

_GREEN, _RED, _GREY, _BLUE, _ORANGE = "#2e8b57", "#c0392b", "#888888", "#1f5fa8", "#d35400"


def svg_timeline(r: Report) -> str:
    """One row per control connection (commands above, replies below, announcements in
    colour) and one per data connection (green worked, red failed, grey unmatched), with
    dashed links from each announcement to the data connections it led to. The time axis is
    ordinal (one step per event, real times as labels): FTP events come in bursts of
    milliseconds between seconds of waiting."""
    events: list[float] = []
    for s in r.sessions:
        events += [ln.t for ln in s.lines] + [s.t0, s.t1]
    for c in r.data:
        events += [c.t0, c.t1]
    times = sorted(set(events))
    step, left, top = 30.0, 190.0, 80.0
    x_of = {t: left + i * step for i, t in enumerate(times)}
    t0 = times[0] if times else 0.0
    width = left + max(1, len(times)) * step + 260
    rows: list[str] = []
    y = top
    lane_y: dict[int, float] = {}

    def label(x: float, yy: float, text: str, color: str = "#000", anchor: str = "start", size: int = 11,
              rotate: float | None = None, cls: str = "") -> str:
        rot = f' transform="rotate({rotate} {x:.1f} {yy:.1f})"' if rotate is not None else ""
        c = f' class="{cls}"' if cls else ""
        return (f'<text x="{x:.1f}" y="{yy:.1f}" fill="{color}" font-size="{size}" text-anchor="{anchor}"'
                f'{rot}{c}>{html.escape(text)}</text>')

    links: list[str] = []
    for i, s in enumerate(r.sessions, 1):
        y += 130 if i == 1 else 260  # room for the slanted labels above and below the lane
        color = {"ok": _GREEN, "failed": _RED, "encrypted": _GREY}[s.verdict]
        x0, x1 = x_of[s.t0], max(x_of[s.t1], x_of[s.t0] + 4)
        rows.append(f'<g class="lane control" id="control-{i}">')
        rows.append(label(10, y + 4, f"control {i}", size=12))
        rows.append(label(10, y + 18, f"{hostport(s.client, s.cport)}", _GREY, size=10))
        rows.append(label(10, y + 30, f"-> {hostport(s.server, s.sport)}", _GREY, size=10))
        rows.append(f'<line x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}" stroke="{color}" '
                    f'stroke-width="6"/>')
        anns = {id(a.line): a for a in s.announcements}
        for ln in s.lines:
            x = x_of[ln.t]
            a = anns.get(id(ln))
            txt = _line_text(ln.text)
            if ftp.command_verb(ln.text) == b"PASS":
                txt = "PASS ****"
            txt = txt[:30] + ("…" if len(txt) > 30 else "")
            mark = _ORANGE if a is not None else ("#333" if ln.d == 0 else _BLUE)
            dy = -8 if ln.d == 0 else 8
            rows.append(f'<circle cx="{x:.1f}" cy="{y + dy:.1f}" r="{5 if a else 3}" fill="{mark}" '
                        f'class="{"announcement" if a else ("command" if ln.d == 0 else "reply")}"/>')
            if ln.d == 0:
                rows.append(label(x, y - 14, txt, mark, rotate=-40, size=10))
            else:
                rows.append(label(x, y + 22, txt, mark, rotate=40, size=10))
        if s.encrypted_at is not None:
            rows.append(label(x1 + 6, y + 4, f"TLS after packet {s.encrypted_at}", _GREY))
        rows.append("</g>")
        lane_y[i] = y
    y += 150
    data_rows: list[str] = []
    owner: dict[int, tuple[Announcement, int]] = {}
    for i, s in enumerate(r.sessions, 1):
        for a in s.announcements:
            for c in a.data:
                owner[id(c)] = (a, i)
    for j, c in enumerate(r.data, 1):
        y += 34
        st = c.status
        color = _GREEN if st == "ok" else (_RED if c.matched else _GREY)
        x0, x1 = x_of[c.t0], max(x_of[c.t1], x_of[c.t0] + 6)
        data_rows.append(f'<g class="lane data {st}" id="data-{j}">')
        data_rows.append(label(10, y + 4, f"data {j}", size=12))
        data_rows.append(f'<line x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}" stroke="{color}" '
                         f'stroke-width="6"/>')
        if st != "ok":
            data_rows.append(label(x0 - 4, y + 4, "✗", color, anchor="end", size=14))
        data_rows.append(label(x1 + 8, y + 4, f"{hostport(c.a, c.aport)} → {hostport(c.b, c.bport)}: {st}"
                               f"{f', {c.bytes_ab + c.bytes_ba} B' if c.synack else ''}", color, size=10))
        data_rows.append("</g>")
        if id(c) in owner:
            a, i = owner[id(c)]
            ax = x_of[a.line.t]
            links.append(f'<line class="link" x1="{ax:.1f}" y1="{lane_y[i] + (-8 if a.active else 8):.1f}" '
                         f'x2="{x0:.1f}" y2="{y:.1f}" stroke="{_ORANGE}" stroke-dasharray="4 3"/>')
    # announcements that led to no data connection
    for i, s in enumerate(r.sessions, 1):
        for a in s.announcements:
            if not a.data and not a.ok:
                ax = x_of[a.line.t]
                links.append(label(ax + 6, lane_y[i] + 48, "✗ no data connection", _RED, size=10))
    height = y + 60
    axis = [f'<line x1="{left:.1f}" y1="{top:.1f}" x2="{width - 260:.1f}" y2="{top:.1f}" stroke="#ccc"/>']
    for t in times[:: max(1, len(times) // 30)]:
        axis.append(label(x_of[t], top - 6, f"{t - t0:.3f}", _GREY, size=9, rotate=-40))
    title = f"ftpalg explain {Path(r.path).name}"
    legend = (f'{label(10, 16, title, size=13)}'
              f'{label(360, 16, "● command", "#333", size=10)}{label(440, 16, "● reply", _BLUE, size=10)}'
              f'{label(500, 16, "● PORT/EPRT/227/229", _ORANGE, size=10)}'
              f'{label(640, 16, "— worked", _GREEN, size=10)}{label(700, 16, "— failed", _RED, size=10)}'
              f'{label(760, 16, "— not matched", _GREY, size=10)}'
              f'{label(10, 32, "time axis: one step per event, seconds from the first", _GREY, size=9)}')
    body = "\n".join([legend, *axis, *rows, *data_rows, *links])
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n')


# ---- command line -------------------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be a number, not {text!r}") from None
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"port {n} not in 1..65535")
    return n


def add_parser(sub: Any) -> None:
    """Register ``ftpalg explain`` on the CLI's subparsers."""
    e = sub.add_parser("explain", help="explain a capture offline: what ftpalg would rewrite and open, why a "
                                       "transfer failed",
                       description="Run ftpalg's core offline over a pcap/pcapng capture taken on either side of "
                                   "a gateway: per FTP session, each PORT/EPRT/LPRT/227/228/229 with what ftpalg "
                                   "would do, the data connections seen, and why a transfer failed.")
    e.add_argument("capture", type=Path, help="pcap or pcapng file (tcpdump -w; include the data connections: "
                                              "capture 'tcp', not only 'port 21')")
    e.add_argument("--public", metavar="ADDR", help="the gateway's public address, when the capture was taken "
                                                     "behind it (otherwise shown as <public>)")
    e.add_argument("--control-port", type=_port, action="append", metavar="PORT",
                   help="FTP control port (repeatable; default 21)")
    e.add_argument("--min-port", type=_port, default=1024, metavar="PORT",
                   help="as ftpalg run's --min-port (default 1024)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.add_argument("--svg", type=Path, metavar="FILE", help="also write a timeline picture (SVG)")
    e.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    """0: nothing failed; 1: a session failed; 2: the capture cannot be explained."""
    public = args.public
    if public is not None:
        try:
            public = str(ipaddress.ip_address(public))
        except ValueError:
            print(f"ftpalg explain: --public {public!r} is not an IP address", file=sys.stderr)
            return 2
    try:
        report = explain(args.capture, public, frozenset(args.control_port or [21]), Limits(min_port=args.min_port))
    except ExplainError as e:
        print(f"ftpalg explain: {e}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(json_report(report), indent=2) + "\n")
    else:
        sys.stdout.write(text_report(report))
    if args.svg is not None:
        try:
            args.svg.write_text(svg_timeline(report), encoding="utf-8")
        except OSError as e:
            print(f"ftpalg explain: cannot write {args.svg}: {e.strerror or e}", file=sys.stderr)
            return 2
    return 1 if report.failed else 0
