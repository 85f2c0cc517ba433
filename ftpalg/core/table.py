"""The ALG core: one ``Flow`` per FTP control connection and the ``Alg`` table over them.

Segments in, payload/seq/ack decisions out; pinholes go through an injected backend and the
NAT mapping comes from an injected lookup, so this module does no I/O and is driven by
tests with plain bytes.

Directions: 0 = client -> server (the connection's original direction, towards the control
port), 1 = server -> client. Keys are the (src, sport, dst, dport) of packets as the hook
sees them; the hook sits before NAT (raw PREROUTING), so server -> client packets carry the
public address and are found through the reply tuple of the NAT mapping.

Pinhole life: opened when a PORT/EPRT is rewritten; closed when the server refuses the
command (4xx/5xx), when the transfer command that used it gets its final reply, when a new
PORT/EPRT replaces it, on FIN/RST of the control connection, or after ``pinhole_timeout``.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections import Counter, deque
from dataclasses import dataclass
from typing import Protocol

from . import ftp, policy
from .packet import DecodeError, Segment, TcpFlags, decode, encode
from .seqadj import MASK, SeqAdjust, Unreplayable
from .stream import Stream

log = logging.getLogger("ftpalg")

FlowKey = tuple[bytes, int, bytes, int]
C2S, S2C = 0, 1
TRANSFER_VERBS = frozenset({b"RETR", b"STOR", b"STOU", b"APPE", b"LIST", b"NLST", b"MLSD"})
HOSTPORT_VERBS = frozenset({b"PORT", b"EPRT"})
MAX_PENDING = 64
MAX_LOOKUPS = 3
CLOSE_GRACE = 60.0  # keep corrections this long after both FINs (late retransmissions)
IDLE_CHECK = 600.0  # idle flows older than this are dropped once conntrack forgot them


@dataclass(frozen=True, slots=True)
class Pinhole:
    """Let ``peer`` (any port) reach ``public``:``public_port``, DNAT to ``inside``:``inside_port``."""

    id: int
    peer: str
    public: str
    public_port: int
    inside: str
    inside_port: int
    expires: float

    def describe(self) -> str:
        return (
            f"id={self.id} from={self.peer} to={self.public}:{self.public_port}"
            f" dnat={self.inside}:{self.inside_port}"
        )


class NatLookup(Protocol):
    def reply_tuple(self, key: FlowKey) -> FlowKey | None:
        """The reply tuple (src, sport, dst, dport) of the connection whose original tuple
        is ``key``, or None if conntrack has no such connection."""


class PinholeBackend(Protocol):
    def open(self, ph: Pinhole) -> None:
        """Install ``ph``; raise on failure."""

    def close(self, ph: Pinhole) -> None:
        """Remove ``ph``; raise on failure."""


def addr_text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def key_text(key: FlowKey) -> str:
    s, sp, d, dp = key
    return f"{addr_text(s)}:{sp}>{addr_text(d)}:{dp}"


class Flow:
    __slots__ = (
        "key", "reply_key", "client", "family", "streams", "adj",
        "pending", "pinhole", "fin", "closed_at", "last_seen", "logged", "reply_code", "lookups",
    )

    def __init__(self, key: FlowKey, now: float) -> None:
        self.key = key
        self.reply_key: FlowKey | None = None
        self.client = addr_text(key[0])
        self.family = 4 if len(key[0]) == 4 else 6
        self.streams = (Stream(), Stream())
        self.adj = (SeqAdjust(), SeqAdjust())
        self.pending: deque[tuple[bytes, int]] = deque(maxlen=MAX_PENDING)
        self.pinhole: Pinhole | None = None
        self.fin = [False, False]
        self.closed_at: float | None = None
        self.last_seen = now
        self.logged: set[str] = set()
        self.reply_code = 0  # code of an open multi-line reply, 0 if none
        self.lookups = 0  # NAT mapping look-ups tried

    @property
    def corrected(self) -> bool:
        """Whether seq/ack corrections apply to this connection."""
        return self.adj[0].active or self.adj[1].active


class Alg:
    """All tracked control connections of one gateway."""

    def __init__(
        self,
        nat: NatLookup,
        pinholes: PinholeBackend,
        control_ports: frozenset[int] = frozenset({21}),
        pinhole_timeout: float = 120.0,
        rng: random.Random | None = None,
    ) -> None:
        self.nat = nat
        self.rng = rng or random.SystemRandom()
        self.backend = pinholes
        self.control_ports = control_ports
        self.pinhole_timeout = pinhole_timeout
        self.flows: dict[FlowKey, tuple[Flow, int]] = {}
        self.promised: dict[tuple[str, str, int], Pinhole] = {}  # (peer, public, port)
        self.counters: Counter[str] = Counter()
        self._next_id = 1

    # ---- per packet -------------------------------------------------------------------
    def handle(self, raw: bytes, now: float) -> bytes | None:
        """Process one IP packet; return the packet to send instead, None to pass it
        unchanged, or b'' to drop it."""
        self.counters["packets"] += 1
        try:
            seg = decode(raw)
        except DecodeError as e:
            self._count("undecodable", str(e))
            return None
        key: FlowKey = (seg.src, seg.sport, seg.dst, seg.dport)
        hit = self.flows.get(key)
        if seg.truncated:  # cannot be rewritten: a copy must never be sent back for a packet
            self._count("truncated", f"copy {len(raw)} of {seg.total_len} bytes")
            if hit is not None and hit[0].corrected:
                # Unchanged, its seq/ack would contradict the corrected stream: drop it and
                # let TCP resend (a resent segment is not coalesced, so it fits).
                self.counters["dropped_truncated"] += 1
                return b""
            return None
        if hit is None:
            if seg.dport not in self.control_ports:
                return None  # server -> client before any correction: nothing to adjust
            flow = Flow(key, now)
            self.flows[key] = (flow, C2S)
            self.counters["flows"] += 1
            hit = (flow, C2S)
        flow, direction = hit
        return self._segment(flow, direction, seg, now)

    def _segment(self, flow: Flow, d: int, seg: Segment, now: float) -> bytes | None:
        flow.last_seen = now
        flags = seg.flags
        if d == C2S and flow.reply_key is None and flags & TcpFlags.ACK and not flags & TcpFlags.SYN:
            # From the client's first ACK on, conntrack holds the NAT mapping: learning it now
            # lets us follow the server's replies from its greeting on.
            self._learn_mapping(flow)
        if flags & TcpFlags.SYN:
            known = flow.streams[C2S].next_seq
            if d == C2S and not flags & TcpFlags.ACK and known is not None and known != (seg.seq + 1) & MASK:
                self._end(flow, "reused by a new SYN")
                self.counters["flows_reused"] += 1
                flow = Flow(flow.key, now)
                self.flows[flow.key] = (flow, C2S)
            flow.streams[d].syn(seg.seq)
        payload = seg.payload
        out_payload = payload
        if payload and not flags & TcpFlags.RST:
            try:
                out_payload = self._data(flow, d, seg, payload, now)
            except Unreplayable as e:
                self.counters["dropped_unreplayable"] += 1
                self._log_once(flow, "unreplayable", str(e))
                return b""
        adj_out, adj_in = flow.adj[d], flow.adj[1 - d]
        seq = adj_out.forward(seg.seq) if adj_out.active else seg.seq
        ack = seg.ack
        sack = None
        if flags & TcpFlags.ACK and adj_in.active:
            ack = adj_in.backward(seg.ack)
            sack = adj_in.backward
        if flags & (TcpFlags.FIN | TcpFlags.RST):
            self._closing(flow, d, bool(flags & TcpFlags.RST), now)
        if out_payload is payload and seq == seg.seq and ack == seg.ack and sack is None:
            return None
        self.counters["rewritten_packets"] += 1
        try:
            return encode(seg, out_payload, seq, ack, sack)
        except DecodeError as e:
            self._count("encode_failed", str(e))
            return None

    def _data(self, flow: Flow, d: int, seg: Segment, payload: bytes, now: float) -> bytes:
        lines = flow.streams[d].feed(seg.seq, payload)
        if lines.gap:
            self._count("gap", "data before this segment not seen; lines not inspected", flow)
        out = flow.adj[d].replay(seg.seq, payload[: lines.old]) if lines.old else b""
        if len(out) < lines.old or lines.old == len(payload):
            return out if out != payload else payload
        pos = lines.old
        parts = [out]
        for off, line in lines.lines:
            if d == C2S:
                new = self._command(flow, seg.seq + off, line, now)
            else:
                self._reply(flow, line)
                new = line
            if new is not line:
                parts.append(payload[pos:off])
                parts.append(new)
                pos = off + len(line)
        if lines.tail and d == C2S and lines.tail[:4].upper() in (b"PORT", b"EPRT"):
            self._count("partial_line", "PORT/EPRT line split across segments: not rewritten", flow)
        if len(parts) == 1 and not lines.old:
            return payload
        parts.append(payload[pos:])
        res = b"".join(parts)
        return payload if res == payload else res

    # ---- FTP ----------------------------------------------------------------------------
    def _command(self, flow: Flow, seq: int, line: bytes, now: float) -> bytes:
        verb = ftp.command_verb(line)
        new = line
        if verb in HOSTPORT_VERBS and flow.closed_at is None and not any(flow.fin):
            new = self._hostport(flow, seq, line, now)
        if flow.reply_key is not None:  # replies are followed: match them to commands
            flow.pending.append((verb, flow.pinhole.id if flow.pinhole else 0))
        return new

    def _hostport(self, flow: Flow, seq: int, line: bytes, now: float) -> bytes:
        try:
            hp = ftp.parse_hostport(line)
        except ftp.ParseError as e:
            self._count("malformed", f"{e}: {line[:80]!r}", flow)
            return line
        if hp is None:
            return line
        self._close_pinhole(flow, "replaced by a new " + hp.form.value)
        why = policy.refuse_reason(hp, flow.client, flow.family)
        if why:
            self._count("refused", f"{hp.form.value} {hp.addr}:{hp.port}: {why}", flow)
            return line
        if flow.reply_key is None and not self._learn_mapping(flow, force=True):
            self._count("no_nat_mapping", "conntrack has no entry for the control connection", flow)
            return line
        assert flow.reply_key is not None
        # The reply tuple names the real server (after any DNAT) and the address it sees.
        peer, public = addr_text(flow.reply_key[0]), addr_text(flow.reply_key[2])
        for port in policy.candidate_ports(hp.port, self.rng):
            if (peer, public, port) not in self.promised:
                break
        else:
            self._count("no_free_port", f"no free public port for {hp.port} in {policy.PORT_TRIES} tries", flow)
            return line
        ph = Pinhole(self._next_id, peer, public, port, flow.client, hp.port, now + self.pinhole_timeout)
        try:
            self.backend.open(ph)
        except Exception as e:  # the backend's failure must not take the packet with it
            self._count("pinhole_failed", f"{ph.describe()}: {e}", flow)
            return line
        self._next_id += 1
        flow.pinhole = ph
        self.promised[(ph.peer, ph.public, ph.public_port)] = ph
        self.counters["pinholes_opened"] += 1
        new = ftp.rewrite_line(line, hp, public, port)
        log.info("pinhole open %s flow=%s %s", ph.describe(), key_text(flow.key),
                 f"{line.strip()!r} -> {new.strip()!r}" if new != line else "unchanged")
        if new != line:
            flow.adj[C2S].add(seq, len(line), new)
            self.counters["rewrites"] += 1
            return new
        return line

    def _learn_mapping(self, flow: Flow, force: bool = False) -> bool:
        """Ask conntrack for the control connection's reply tuple (a few tries per flow,
        unless ``force``); index the flow under it for server -> client packets."""
        if flow.lookups >= MAX_LOOKUPS and not force:
            return False
        flow.lookups += 1
        self.counters["nat_lookups"] += 1
        reply = self.nat.reply_tuple(flow.key)
        if reply is None:
            return False
        flow.reply_key = reply
        self.flows[reply] = (flow, S2C)
        return True

    def _reply(self, flow: Flow, line: bytes) -> None:
        if flow.reply_code:
            if line[:3] == b"%03d" % flow.reply_code and line[3:4] != b"-":
                code, flow.reply_code = flow.reply_code, 0
                self._final_reply(flow, code)
            return
        r = ftp.parse_reply(line)
        if r is None:
            return
        if not r.final:
            flow.reply_code = r.code
        elif r.code >= 200:
            self._final_reply(flow, r.code)

    def _final_reply(self, flow: Flow, code: int) -> None:
        if not flow.pending:
            return  # greeting or unsolicited (e.g. 421)
        verb, ph_id = flow.pending.popleft()
        ph = flow.pinhole
        if ph is None:
            return
        if verb in HOSTPORT_VERBS and code >= 400 and ph_id == ph.id:
            self._close_pinhole(flow, f"server refused {verb.decode()} ({code})")
        elif verb in TRANSFER_VERBS and ph_id == ph.id:
            self._close_pinhole(flow, f"{verb.decode()} finished ({code})")

    # ---- life cycle ---------------------------------------------------------------------
    def _close_pinhole(self, flow: Flow, why: str) -> None:
        ph = flow.pinhole
        if ph is None:
            return
        flow.pinhole = None
        self.promised.pop((ph.peer, ph.public, ph.public_port), None)
        try:
            self.backend.close(ph)
        except Exception as e:
            self._count("pinhole_close_failed", f"{ph.describe()}: {e}", flow)
        self.counters["pinholes_closed"] += 1
        log.info("pinhole close id=%d: %s", ph.id, why)

    def _closing(self, flow: Flow, d: int, rst: bool, now: float) -> None:
        flow.fin[d] = True
        self._close_pinhole(flow, "control connection reset" if rst else "control connection closing")
        if rst or all(flow.fin):
            flow.closed_at = now

    def _end(self, flow: Flow, why: str) -> None:
        self._close_pinhole(flow, why)
        for k in (flow.key, flow.reply_key):
            if k is not None and self.flows.get(k, (None,))[0] is flow:
                del self.flows[k]

    def tick(self, now: float) -> None:
        """Expire pinholes and forget finished or vanished connections."""
        for flow, d in list(self.flows.values()):
            if d != C2S:
                continue
            if flow.pinhole is not None and flow.pinhole.expires <= now:
                self._close_pinhole(flow, "timeout")
            if flow.closed_at is not None and now - flow.closed_at >= CLOSE_GRACE:
                self._end(flow, "closed")
            elif now - flow.last_seen >= IDLE_CHECK:
                if not flow.corrected:
                    self._end(flow, "idle")
                elif self.nat.reply_tuple(flow.key) is None:
                    self._end(flow, "gone from conntrack")
                else:
                    flow.last_seen = now

    def shutdown(self) -> None:
        """Close every pinhole (flows are kept in memory only)."""
        for flow, d in list(self.flows.values()):
            if d == C2S:
                self._end(flow, "shutdown")

    # ---- accounting ---------------------------------------------------------------------
    def _count(self, reason: str, detail: str, flow: Flow | None = None) -> None:
        self.counters[reason] += 1
        if flow is not None:
            self._log_once(flow, reason, detail)
        elif self.counters[reason] == 1 or self.counters[reason] % 1000 == 0:
            log.warning("%s (seen %d times): %s", reason, self.counters[reason], detail)

    def _log_once(self, flow: Flow, reason: str, detail: str) -> None:
        if reason not in flow.logged:
            flow.logged.add(reason)
            log.warning("%s flow=%s: %s", reason, key_text(flow.key), detail)
