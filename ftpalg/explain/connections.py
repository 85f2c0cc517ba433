"""The connections in a capture: FTP control connections (``Session``, with their command
and reply ``Line``s), every other TCP connection (``DataConn``: SYN, SYN/ACK, RST, bytes,
an ICMP error about it), and the ``Announcement`` records (PORT/EPRT/LPRT/227/228/229)
that the later stages fill in.

Only what the capture shows is read here: no NAT mapping (nat.py), no core (replay.py), no
judgement (diagnose.py). Lines are read in stream order per direction, retransmissions
skipped and lines joined across segments, until AUTH TLS's 234 encrypts the rest.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..core import ftp
from ..core.addr import FlowKey, addr_text, hostport, packed
from ..core.kernel import Pinhole
from ..core.packet import DecodeError, Segment, TcpFlags, decode
from ..core.policy import Mapping
from ..core.seqadj import MASK, diff
from .capture import Frame

# ---- addresses and lines as text (the package's one copy of each) ------------------------------


def line_text(b: bytes) -> str:
    """A command or reply line as text, without its line end."""
    return b.decode("latin-1").rstrip("\r\n")


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
        return (packed(self.client), self.cport, packed(self.server), self.sport)


def tcp_conns(frames: list[Frame], control_ports: frozenset[int]
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


def control_lines(s: Session, segs: list[tuple[int, float, Segment]]) -> None:
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
