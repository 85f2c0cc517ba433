"""The connection table and the per-packet walk: decode -> connection -> session -> edits ->
encode.

One ``Flow`` per FTP control connection holds the TCP view (two byte streams, their edits,
FIN/RST state) and the FTP view (a ``Session``, which knows nothing of sequence numbers).
Pinholes go through an injected backend and the NAT mapping comes from an injected lookup,
so this module does no I/O and is driven by tests with plain bytes.

Directions: 0 = client -> server (the connection's original direction, towards the control
port), 1 = server -> client. Keys are the (src, sport, dst, dport) of packets as the hook
sees them; the hook sits after conntrack but before NAT (mangle PREROUTING), so a packet of
either direction carries the addresses of its side of the gateway: the client's packets are
found by the original tuple, the server's by the reply tuple of the NAT mapping.

Sequence numbers are the kernel's job: for every rewrite that changes a line's length the
core asks conntrack to add the change to the connection's sequence adjustment (one
correction point per direction, as nf_nat_ftp keeps); the kernel then shifts seq, ack and
SACK of every later packet, and that state outlives this process. The core keeps its own
history of edits only to replay retransmitted bytes identically and to correct the seq of a
retransmission older than the kernel's correction point (which the kernel alone would shift
by the wrong offset).
"""

from __future__ import annotations

import logging
import random
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from . import ftp, policy
from .packet import ACK, FIN, RST, SYN, DecodeError, Segment, decode, encode
from .policy import Limits, Mapping, addr_text
from .seqadj import MASK, KernelAdj, SeqAdjust, Unreplayable, diff
from .session import NOTHING, Decision, Session, Transfer
from .stream import Stream

log = logging.getLogger("ftpalg")

FlowKey = tuple[bytes, int, bytes, int]
C2S, S2C = 0, 1
MAX_LOOKUPS = 3
CLOSE_GRACE = 60.0  # keep corrections this long after both FINs (late retransmissions)
IDLE_CHECK = 600.0  # idle flows older than this are dropped once conntrack forgot them
_PARTIAL_VERBS = (b"PORT", b"EPRT", b"LPRT")
_PARTIAL_CODES = (b"227", b"228", b"229")
# Seconds a segment ending inside a line may wait for the rest. Longer than a sender's
# retransmission timeout (Linux: 200 ms minimum once it has an RTT sample): a sender that
# delays small writes (Nagle) sends the rest only when the first part is acknowledged or its
# timer fires, and then sends it (or a copy of the first part, which is dropped) while the
# first part still waits here.
HOLD_TIME = 0.5
HOLD_BYTES = 512  # the longest partial line held
HOLD_SEGMENTS = 4  # the most segments one line may span
# Segments that arrived ahead of the stream are kept until the hole fills: at most this many,
# this far ahead, this long. The hole is a segment lost on the way to us more often than one
# reordered: it comes back with the sender's retransmission, after 200 + 400 + 800 ms of
# back-off when lost three times in a row.
AHEAD_TIME = 2.0
AHEAD_SEGMENTS = 8
AHEAD_BYTES = 16384  # how far ahead of the stream such a segment may start
REUSE_WINDOW = 1 << 24  # how far behind a closed stream's end a late retransmission may start
EVICT_SHARE = 16  # at the flow cap, forget this share of the tracked flows (least recently seen)


def _tls_record_start(payload: bytes) -> bool:
    """Whether ``payload`` starts like a TLS record (content type 20-23, version 3.x): no FTP
    line starts with these control bytes."""
    return len(payload) >= 5 and 20 <= payload[0] <= 23 and payload[1] == 3 and payload[2] <= 4


class Held:
    """What ``Alg.handle`` returns for a packet whose verdict waits: the caller keeps the
    packet (its ``token``) until the core hands it back through ``take_released``."""


HELD = Held()
_SLOW = Held()  # ``_steady``: not a segment it takes; nothing done, the general walk follows
_CTL = SYN | FIN | RST | ACK


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a setattr call per field
class Pending:
    """A decided payload whose packet is encoded only when its verdict is handed out: the
    seq it needs depends on the kernel's correction point at that moment, which a later
    rewrite in the same call may still move."""

    flow: Flow
    d: int
    seg: Segment
    payload: bytes


Decision_ = Pending | bytes | None  # what a packet's verdict will be: encode, drop (b''), unchanged


@dataclass(slots=True)
class HeldSeg:
    token: object  # the caller's handle of the queued packet
    seg: Segment
    out: bytes  # its payload as far as decided: lines before the partial one, rewritten
    tail_off: int  # where the partial line starts in the payload as it came
    since: float
    keep: int = 0  # where it starts in ``out`` (earlier lines may have been rewritten)


@dataclass(frozen=True, slots=True)
class Pinhole:
    """Let ``peer`` (any port) connect to ``public``:``public_port``; send it to
    ``inside``:``inside_port`` (DNAT unless equal) and let it leave from ``snat`` (SNAT, if
    set). One connection only; ``expires`` on the caller's clock."""

    id: int
    peer: str
    public: str
    public_port: int
    inside: str
    inside_port: int
    expires: float
    snat: str | None = None
    master: FlowKey = (b"", 0, b"", 0)  # the control connection's original tuple
    active: bool = True  # the data connection goes towards the client (PORT/EPRT/LPRT)
    form: str = ""  # the announcement's form (PORT, EPSV, ...)

    @property
    def family(self) -> int:
        return 6 if ":" in self.peer else 4

    @property
    def dnat(self) -> bool:
        return (self.public, self.public_port) != (self.inside, self.inside_port)

    def describe(self) -> str:
        s = f"id={self.id} from={self.peer} to={_hostport(self.public, self.public_port)}"
        if self.dnat:
            s += f" dnat={_hostport(self.inside, self.inside_port)}"
        return s + (f" snat={self.snat}" if self.snat else "")


def _hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


class NatLookup(Protocol):
    """The kernel's connection tracking, as far as the core needs it."""

    def reply_tuple(self, key: FlowKey) -> FlowKey | None:
        """The reply tuple (src, sport, dst, dport) of the connection whose original tuple
        is ``key``, or None if conntrack has no such connection."""

    def seq_adjust(self, key: FlowKey, direction: int, seq: int, delta: int) -> KernelAdj:
        """Add ``delta`` bytes at the segment of ``direction`` starting at ``seq`` to the
        connection's kernel sequence adjustment; return the direction's new state. Raise if
        the kernel cannot carry it for this connection."""

    # Optional, used when present (each saves a netlink round trip):
    #   mapping(key) -> (reply tuple, whether the kernel holds any sequence correction for
    #       the connection) | None: the look-up of ``reply_tuple`` with what it read besides;
    #   seq_adjust_from(key, direction, seq, delta, known) -> KernelAdj: ``seq_adjust`` when
    #       the direction's kernel state is ``known`` (not read again).


class PinholeBusy(Exception):
    """The public port of a pinhole is already expected by another connection."""


class PinholeBackend(Protocol):
    def open(self, ph: Pinhole) -> None:
        """Install ``ph``; raise PinholeBusy if its public port is taken, anything else on
        failure."""

    def close(self, ph: Pinhole) -> None:
        """Remove ``ph``; raise on failure."""

    # Optional, used when present: close_used(ph): remove ``ph`` whose transfer is over (the
    # kernel has most likely dropped it once used), without waiting to hear that it was gone.


def key_text(key: FlowKey) -> str:
    s, sp, d, dp = key
    return f"{_hostport(addr_text(s), sp)}>{_hostport(addr_text(d), dp)}"


class Flow:
    """One control connection: its TCP view and its FTP session."""

    __slots__ = ("key", "reply_key", "mapping", "streams", "adj", "session", "pinhole",
                 "fin", "closed_at", "last_seen", "logged", "lookups", "kadj", "held", "held_snap",
                 "dropped_at", "ahead", "last_pinhole")

    def __init__(self, key: FlowKey, now: float) -> None:
        self.key = key
        self.reply_key: FlowKey | None = None
        self.mapping: Mapping | None = None
        self.streams = (Stream(), Stream())
        self.adj = (SeqAdjust(), SeqAdjust())
        self.session = Session()
        self.pinhole: Pinhole | None = None
        self.fin = [False, False]
        self.closed_at: float | None = None
        self.last_seen = now
        self.logged: tuple[str, ...] = ()  # reasons logged for it (a few; an empty set is 216 bytes)
        self.lookups = 0  # NAT mapping look-ups tried
        self.kadj: list[KernelAdj | None] = [None, None]  # the kernel's adjustment, when known
        self.held: list[list[HeldSeg]] = [[], []]  # segments waiting, per direction
        self.held_snap: list[tuple[int | None, bool]] = [(None, True), (None, True)]  # stream before them
        self.dropped_at: list[int | None] = [None, None]  # line start whose segments were dropped once
        self.ahead: list[list[tuple[object, Segment, float]]] = [[], []]  # out of order, per direction
        self.last_pinhole: Pinhole | None = None  # the latest pinhole opened, open or not

    @property
    def corrected(self) -> bool:
        """Whether lines of this connection were rewritten (the kernel corrects seq/ack)."""
        return self.adj[0].active or self.adj[1].active

    @property
    def closing(self) -> bool:
        return self.closed_at is not None or any(self.fin)


class Alg:
    """All tracked control connections of one gateway."""

    def __init__(
        self,
        nat: NatLookup,
        pinholes: PinholeBackend,
        control_ports: frozenset[int] = frozenset({21}),
        pinhole_timeout: float = 120.0,
        rng: random.Random | None = None,
        limits: Limits = policy.DEFAULT_LIMITS,
        on_transfer: Callable[[dict[str, object]], None] | None = None,
    ) -> None:
        self.nat = nat
        self.limits = limits
        self.on_transfer = on_transfer  # gets one record per transfer command answered (audit)
        self.rng = rng or random.SystemRandom()
        self.backend = pinholes
        # the backends' optional short cuts (see NatLookup, PinholeBackend)
        self._mapping: Callable[[FlowKey], tuple[FlowKey, bool] | None] | None = getattr(nat, "mapping", None)
        self._adjust_from: Callable[[FlowKey, int, int, int, KernelAdj], KernelAdj] | None = getattr(
            nat, "seq_adjust_from", None)
        self._close_used: Callable[[Pinhole], None] | None = getattr(pinholes, "close_used", None)
        self.control_ports = control_ports
        self.pinhole_timeout = pinhole_timeout
        self.flows: dict[FlowKey, tuple[Flow, int]] = {}
        self.promised: dict[tuple[str, str, int], Pinhole] = {}  # (peer, public, port)
        self.counters: Counter[str] = Counter()
        self._next_id = 1
        self.released: list[tuple[object, Decision_]] = []  # held packets' verdicts, in order
        self.holding: set[Flow] = set()  # flows with held or kept-ahead segments (timers look only here)
        # Client ISNs of handshakes not yet complete: a SYN costs an entry here, not a Flow
        # (a SYN flood fills this bounded FIFO and nothing else).
        self.syns: OrderedDict[FlowKey, int] = OrderedDict()
        # Where the client streams of flows forgotten at the flow cap stood (next seq, at a line
        # start): a flow seen again continues from there, not from a guess.
        self.evicted: OrderedDict[FlowKey, tuple[int | None, bool]] = OrderedDict()
        self.tracked = 0  # flows (control connections) in ``flows``
        self.per_client: Counter[str] = Counter()  # live pinholes per FTP client address
        self.held_bytes = 0  # payload bytes of held and kept-ahead segments (recounted each wake-up)

    def take_released(self) -> list[tuple[object, bytes | None]]:
        """Verdicts for held packets (token, packet to send / None unchanged / b'' drop),
        to apply before the verdict of the packet just handled, in this order."""
        if not self.released:  # the usual case (asked after every packet): nothing was held
            return []
        out, self.released = self.released, []
        return [(token, self._final(x)) for token, x in out]

    def _final(self, x: Decision_) -> bytes | None:
        return self._finish(x.flow, x.d, x.seg, x.payload) if isinstance(x, Pending) else x

    # ---- per packet -------------------------------------------------------------------
    def handle(self, raw: bytes, now: float, token: object = None) -> bytes | None | Held:
        """Process one IP packet; return the packet to send instead, None to pass it
        unchanged, b'' to drop it, or HELD: its verdict waits (``token`` identifies it when
        it comes back through ``take_released``)."""
        self.counters["packets"] += 1
        try:
            seg = decode(raw)
        except DecodeError as e:
            self._count("undecodable", str(e))
            return None
        key: FlowKey = (seg.src, seg.sport, seg.dst, seg.dport)
        hit = self.flows.get(key)
        if hit is not None and seg.flags & _CTL == ACK and not seg.truncated:
            out = self._steady(hit[0], hit[1], seg, now)
            if out is not _SLOW:
                return out
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
                return None  # server -> client before the mapping is known: nothing to adjust
            flags = seg.flags
            if flags & SYN:
                if not flags & ACK:
                    self._remember_syn(key, seg.seq)
                return None
            isn = self.syns.pop(key, None)
            if flags & (FIN | RST) or (isn is None and not seg.payload):
                return None  # nothing to follow: the end of a connection, or a bare ACK
            new = self._new_flow(key, now, seg.seq)
            if new is None:
                return None
            if isn is not None:
                new.streams[C2S].syn(isn)
            hit = (new, C2S)
        elif seg.payload and not seg.flags & (SYN | RST) and self._reused(*hit, seg):
            # Data beyond the end of a connection we still remember (kept for its late
            # retransmissions): a new connection reused the tuple and its SYN did not come
            # through us (it bypassed a full queue, or came while we were away). The old
            # flow's state (closing, mapping, edits) is not this one's: start afresh.
            self._end(hit[0], "tuple reused by a connection whose SYN was not seen")
            self.counters["flows_reused"] += 1
            if hit[1] != C2S:
                return None  # server data of a connection not tracked yet: nothing to adjust
            new = self._new_flow(key, now)
            if new is None:
                return None
            hit = (new, C2S)
        flow, direction = hit
        res = self._segment(flow, direction, seg, now, token)
        return res if isinstance(res, Held) else self._final(res)

    def _steady(self, flow: Flow, d: int, seg: Segment, now: float) -> bytes | None | Held:
        """The common case without detours: the next segment of a stream, in order, starting
        at a line start and ending with a line end, on a connection that is open, holds and
        keeps nothing, is not encrypted and (client side) knows its NAT mapping. For it this
        does what ``_segment`` -> ``_in_order`` -> ``_data`` -> ``_finish`` do, in the same
        order, without the checks that cannot apply and the objects that carry their results
        (most control segments: USER, 331, TYPE, 200, RETR, 150, 226 ...). Any other segment:
        ``_SLOW``, with nothing changed."""
        payload = seg.payload
        st = flow.streams[d]
        seq = seg.seq
        session = flow.session
        if (not payload or payload[-1] != 0x0A or seq != st.next_seq or not st.at_line_start
                or flow.held[d] or flow.ahead[d] or flow.closed_at is not None or flow.fin[0] or flow.fin[1]
                or session.encrypted or (d == C2S and flow.reply_key is None)
                or 20 <= payload[0] <= 23):  # perhaps a TLS record (_tls_record_start): the general walk
            return _SLOW
        flow.last_seen = now
        n = len(payload)
        st.next_seq = (seq + n) & MASK  # and still at a line start: the payload ends with LF
        out = payload
        parts: list[bytes] | None = None
        pos = i = 0
        while i < n:
            j = payload.find(b"\n", i) + 1  # > 0: the payload ends with LF
            line = payload if j == n and not i else payload[i:j]
            dec = session.command(line, True) if d == C2S else session.reply(line)
            if dec is not NOTHING and dec:
                new = self._act(flow, d, dec, [(seq, i, j - i)], line, now)
                if new is not line:
                    if parts is None:
                        parts = []
                    parts += (payload[pos:i], new)
                    pos = j
                if session.encrypted:  # the rest of the stream is TLS
                    break
            i = j
        if parts is not None:
            parts.append(payload[pos:])
            res = b"".join(parts)
            if res != payload:
                out = res
        if out is payload and not flow.adj[d].edits:
            return None
        return self._finish(flow, d, seg, out)

    @staticmethod
    def _reused(flow: Flow, d: int, seg: Segment) -> bool:
        """Whether ``seg`` (with payload) cannot belong to ``flow``'s connection, which is
        closing (a FIN seen, or a RST): it starts beyond where that direction's stream has
        come (a hole: a closing connection's peer has nothing more to say), or at that point
        after this direction's own FIN or a reset, or far behind it (not a late
        retransmission): a new connection's random ISN. A half-closed connection's other
        direction, in order, goes on as before."""
        if not flow.closing:
            return False
        nxt = flow.streams[d].next_seq
        if nxt is None:
            return False
        off = diff(seg.seq, nxt)
        return off > 0 or off < -REUSE_WINDOW or (off == 0 and (flow.fin[d] or flow.closed_at is not None))

    def _remember_syn(self, key: FlowKey, isn: int) -> None:
        syns = self.syns
        syns[key] = isn
        syns.move_to_end(key)
        if len(syns) > self.limits.max_flows:
            syns.popitem(last=False)
            self.counters["syns_forgotten"] += 1

    def _new_flow(self, key: FlowKey, now: float, seq: int | None = None) -> Flow | None:
        """Track a new control connection, or None at the flow cap when nothing can be
        evicted (the connection then passes untouched: no rewrite, no pinhole)."""
        if self.tracked >= self.limits.max_flows and not self._evict():
            self._count("flow_cap", f"{self.tracked} control connections tracked (--max-flows): "
                                    "a new one passes untouched, without pinholes")
            return None
        flow = Flow(key, now)
        where = self.evicted.pop(key, None)
        if where is not None and seq is not None:
            # Forgotten at the flow cap, seen again at a client segment: if it is the very next
            # one, the client's stream goes on from where it stood; if bytes passed meanwhile
            # (not tracked at the cap), where lines start is unknown until the next line end.
            # The server's stream starts afresh: its replies passed unwatched meanwhile.
            st = flow.streams[C2S]
            nxt, start = where
            st.next_seq, st.at_line_start = seq, start and nxt == seq
        self.flows[key] = (flow, C2S)
        self.tracked += 1
        self.counters["flows"] += 1
        return flow

    def _evict(self) -> int:
        """Forget the least recently seen flows that have no live pinhole and hold nothing,
        those without corrections first (the kernel keeps corrections anyway; only the
        history for exact retransmissions goes). A flow forgotten and seen again is picked
        up mid-stream, as after a restart."""
        victims = sorted((f for f, d in self.flows.values()
                          if d == C2S and f.pinhole is None and f not in self.holding),
                         key=lambda f: (f.corrected, f.last_seen))
        victims = victims[: max(1, self.limits.max_flows // EVICT_SHARE)]
        for f in victims:
            self._end(f, "evicted at the flow cap")
            st = f.streams[C2S]
            self.evicted[f.key] = (st.next_seq, st.at_line_start)
            if len(self.evicted) > 2 * self.limits.max_flows:
                self.evicted.popitem(last=False)
        self.counters["flows_evicted"] += len(victims)
        if victims:
            log.warning("flow cap (--max-flows %d) reached: forgot the %d least recently seen control "
                        "connections", self.limits.max_flows, len(victims))
        return len(victims)

    def _may_hold(self, flow: Flow, size: int) -> bool:
        """Whether ``size`` more bytes may be held back (the --max-held-bytes cap)."""
        if self.held_bytes + size <= self.limits.max_held_bytes:
            self.held_bytes += size
            return True
        self._count("held_cap", f"{self.held_bytes} bytes held (--max-held-bytes): segment not held back",
                    flow)
        return False

    def _segment(self, flow: Flow, d: int, seg: Segment, now: float, token: object = None,
                 draining: bool = False) -> Decision_ | Held:
        if not draining and seg.payload and not seg.flags & (SYN | RST):
            nxt = flow.streams[d].next_seq
            if nxt is not None and diff(seg.seq, nxt) > 0:  # ahead of the stream: a hole before it
                ahead = flow.ahead[d]
                if any(a.seq == seg.seq for _, a, _ in ahead):
                    self.counters["ahead_duplicate"] += 1
                    return b""  # a copy of one kept: the original goes in order
                if (len(ahead) < AHEAD_SEGMENTS and diff(seg.seq, nxt) <= AHEAD_BYTES
                        and not flow.session.encrypted and self._may_hold(flow, len(seg.payload))):
                    ahead.append((token, seg, now))
                    self.holding.add(flow)
                    ahead.sort(key=lambda a: diff(a[1].seq, nxt))
                    self.counters["reordered"] += 1
                    return HELD
                self._drain(flow, d, now, force=True)  # no room: what waited goes first, as after a gap
        out = self._in_order(flow, d, seg, now, token)
        if draining or not flow.ahead[d]:
            return out
        # what waited for the hole this segment filled goes now, after it, in stream order
        if not isinstance(out, Held):
            self.released.append((token, out))
        self._drain(flow, d, now)
        return HELD

    def _drain(self, flow: Flow, d: int, now: float, force: bool = False) -> None:
        """Process the segments kept ahead of the stream whose turn has come (all of them if
        ``force``: the hole did not fill in time, they go on as after a gap)."""
        ahead = flow.ahead[d]
        while ahead:
            nxt = flow.streams[d].next_seq
            token, seg, _ = ahead[0]
            if not force and nxt is not None and diff(seg.seq, nxt) > 0:
                return
            ahead.pop(0)
            out = self._segment(flow, d, seg, now, token, draining=True)
            if not isinstance(out, Held):
                self.released.append((token, out))

    def _in_order(self, flow: Flow, d: int, seg: Segment, now: float, token: object) -> Decision_ | Held:
        flow.last_seen = now
        flags = seg.flags
        if d == C2S and flow.reply_key is None and flags & ACK and not flags & SYN:
            # From the client's first ACK on, conntrack holds the NAT mapping: learning it now
            # lets us follow the server's replies from its greeting on.
            self._learn_mapping(flow)
        if flags & SYN:
            known = flow.streams[C2S].next_seq
            if d == C2S and not flags & ACK and known is not None and known != (seg.seq + 1) & MASK:
                # a new connection on the same tuple: forget the old one; the new one starts
                # like any other, as a remembered SYN, tracked from its handshake's last ACK
                self._end(flow, "reused by a new SYN")
                self.counters["flows_reused"] += 1
                self._remember_syn(flow.key, seg.seq)
                return None
            if not flow.streams[d].takes_syn(seg.seq):
                # inside a stream already followed: the receiver drops it (challenge ACK), so
                # neither its payload nor a reset line start may count
                self._count("syn_mid_stream", f"SYN at seq {seg.seq} inside the stream: ignored", flow)
                return None
            flow.streams[d].syn(seg.seq)
            if seg.payload:  # TCP Fast Open data: starts at seq + 1, and no FTP peer sends it
                st = flow.streams[d]
                st.next_seq = (seg.seq + 1 + len(seg.payload)) & MASK
                st.at_line_start = seg.payload.endswith(b"\n")
                self._count("syn_data", "data on a SYN: not read", flow)
                return None
        payload = seg.payload
        out_payload: bytes | Held = payload
        if flow.held[d] and payload:
            end = (flow.held[d][-1].seg.seq + len(flow.held[d][-1].seg.payload)) & MASK
            if diff(seg.seq, end) < 0:  # a copy of a held segment: the original is kept
                self.counters["held_duplicate"] += 1
                return b""
            if seg.seq != end or flags & (FIN | RST):
                self._release_held(flow, d, "the stream went on without the rest of the line")
        if payload and not flags & RST:
            try:
                out_payload = self._data(flow, d, seg, payload, now, token)
            except Unreplayable as e:
                self.counters["dropped_unreplayable"] += 1
                self._log_once(flow, "unreplayable", str(e))
                return b""
        if isinstance(out_payload, Held):
            return HELD
        if flags & (FIN | RST):
            self._closing(flow, d, bool(flags & RST), now)
        return Pending(flow, d, seg, out_payload)

    def _finish(self, flow: Flow, d: int, seg: Segment, out_payload: bytes) -> bytes | None:
        """The packet to send for ``seg`` with ``out_payload``, or None if it is unchanged."""
        payload = seg.payload
        seq = self._compensate(flow, d, seg) if out_payload and flow.adj[d].edits else seg.seq
        if seq is None:
            return b""
        if out_payload == payload and seq == seg.seq:
            return None
        self.counters["rewritten_packets"] += 1
        try:
            return encode(seg, out_payload, seq, seg.ack)
        except DecodeError as e:
            self._count("encode_failed", str(e))
            return None

    def _compensate(self, flow: Flow, d: int, seg: Segment) -> int | None:
        """The seq to send so that, after the kernel's adjustment, the segment lands where
        this process's edit history says it belongs; None if no seq can (drop it: TCP resends,
        or the receiver already has those bytes). The kernel keeps one correction point per
        direction and shifts a segment by ``before`` up to it and ``after`` beyond: wrong for
        a retransmission from before the last rewrite (two rewrites in flight, or a held
        segment let go after the next rewrite moved the point), and impossible to get right
        for one that starts after the point but before the edit (part of a segment resent).
        Only segments the history covers are touched (after a restart it starts empty)."""
        k = flow.kadj[d]
        adj = flow.adj[d]
        if k is not None and adj.edits:  # the usual case first: new data past the last edit and the
            e = adj.edits[-1]  # kernel's point, where this process and the kernel agree on the shift
            if diff(seg.seq, e.end) >= 0 and diff(seg.seq, k.pos) > 0 and (e.after - k.after) & MASK == 0:
                return seg.seq
        if k is None or (adj.base and diff(seg.seq + len(seg.payload), adj.edits[0].start) <= 0):
            # all of it before this process's first edit, on top of corrections made before
            # (by an earlier run or the other gateway): not ours to know
            return seg.seq
        want = (seg.seq + diff(adj.forward(seg.seq), seg.seq)) & MASK  # where it must land
        if want == (seg.seq + k.seq_offset(seg.seq)) & MASK:
            return seg.seq
        for off in (k.after, k.before):  # a seq on the side of the point that gets ``off``
            x = (want - off) & MASK
            if (diff(x, k.pos) > 0) == (off == k.after) and k.seq_offset(x) == off:
                self.counters["seq_compensated"] += 1
                return x
        self.counters["dropped_unexpressible"] += 1
        return None

    def _data(self, flow: Flow, d: int, seg: Segment, payload: bytes, now: float,
              token: object = None) -> bytes | Held:
        stream = flow.streams[d]
        snap = (stream.next_seq, stream.at_line_start)
        first, consumed = b"", 0  # the end of a line begun in held segments, as it goes out
        if flow.held[d]:
            nl = payload.find(b"\n")
            held = flow.held[d]
            size = sum(len(h.seg.payload) - h.tail_off for h in held) + len(payload)
            if nl < 0 and len(held) < HOLD_SEGMENTS and size <= HOLD_BYTES and self._may_hold(flow, len(payload)):
                stream.feed(seg.seq, payload)
                held.append(HeldSeg(token, seg, payload, 0, now))
                self.holding.add(flow)
                return HELD
            if nl < 0:
                self._release_held(flow, d, "line too long to hold")
            else:
                first, consumed = self._spanning_line(flow, d, seg, payload[: nl + 1], now), nl + 1
        if not flow.session.encrypted and _tls_record_start(payload) and (
                stream.next_seq is None or diff(seg.seq, stream.next_seq) >= 0):
            # The connection went TLS while this process was not watching (a restart, a gap,
            # the other gateway of a pair): nothing more is read from it.
            flow.session.encrypted = True
            self._encrypted(flow, "TLS record seen on a control connection not known to be encrypted: "
                                  "its PORT/EPRT/227/229 cannot be read or rewritten, nothing is opened for it")
        lines = stream.feed(seg.seq, payload)
        if lines.gap:
            if flow.session.encrypted:  # TLS: no line to miss; the stream just goes on
                self.counters["gap_encrypted"] += 1
            else:
                self._count("gap", "data before this segment not seen; lines not inspected", flow)
                if flow.corrected or flow.session.count:
                    self._resync(flow, "bytes of the connection passed elsewhere")
        out = flow.adj[d].replay(seg.seq, payload[: lines.old]) if lines.old else b""
        if len(out) < lines.old or lines.old == len(payload):
            return out if out != payload else payload
        pos = max(lines.old, consumed)
        parts = [out, first]
        session, follow = flow.session, flow.reply_key is not None
        for off, line in lines.lines:
            if session.encrypted:  # the rest of the stream is TLS
                break
            dec = session.command(line, follow) if d == C2S else session.reply(line)
            new = self._act(flow, d, dec, [(seg.seq, off, len(line))], line, now) if dec else line
            if new is not line:
                parts.append(payload[pos:off])
                parts.append(new)
                pos = off + len(line)
        parts.append(payload[pos:])
        res = b"".join(parts)
        tail = lines.tail
        if (tail and self._may_announce(flow, d, tail) and len(tail) <= HOLD_BYTES
                and self._may_hold(flow, len(payload))):
            # The rest of this line is in a later segment: hold this one until it comes.
            flow.held[d].append(HeldSeg(token, seg, res, len(payload) - len(tail), now, len(res) - len(tail)))
            self.holding.add(flow)
            flow.held_snap[d] = snap
            return HELD
        return payload if res == payload else res

    def _may_announce(self, flow: Flow, d: int, tail: bytes) -> bool:
        """Whether a partial line could become one that carries an address."""
        if flow.session.encrypted:
            return False
        if d == C2S:
            head = tail[:4].upper()
            return any(v.startswith(head) for v in _PARTIAL_VERBS)
        if flow.session.reply_code in ftp.PASSIVE_REPLY_CODES and not flow.session.reply_found:
            return True  # inside a multi-line passive reply: any line may carry the address
        return any(c.startswith(tail[:3]) for c in _PARTIAL_CODES)

    def _spanning_line(self, flow: Flow, d: int, seg: Segment, end: bytes, now: float) -> bytes:
        """A line begun in the held segments ends with ``end`` at the start of ``seg``: act
        on it, send the held segments (each keeps its length; its part of the rewritten line
        goes in its place), and return what replaces ``end`` in ``seg`` (carrying any length
        change, so the kernel's single correction point sits at ``seg``)."""
        held, flow.held[d] = flow.held[d], []
        flow.held_snap[d] = (None, True)
        pieces = [h.seg.payload[h.tail_off:] for h in held]
        line = b"".join(pieces) + end
        session, follow = flow.session, flow.reply_key is not None
        dec = session.command(line, follow) if d == C2S else session.reply(line)
        spans = [(h.seg.seq, h.tail_off, len(p)) for h, p in zip(held, pieces, strict=True)]
        new = self._act(flow, d, dec, spans + [(seg.seq, 0, len(end))], line, now) if dec else line
        self.counters["lines_assembled"] += 1
        at = 0
        for h, p in zip(held, pieces, strict=True):
            out = h.out[: h.keep] + new[at : at + len(p)]
            at += len(p)
            self.released.append((h.token, Pending(flow, d, h.seg, out)))
        return new[at:]

    def _release_held(self, flow: Flow, d: int, why: str) -> None:
        """Let the held segments of direction ``d`` go as decided so far (the partial line
        unchanged), counted."""
        held, flow.held[d] = flow.held[d], []
        flow.held_snap[d] = (None, True)
        if not held:
            return
        self._count("partial_line", f"address-carrying line split across segments not rewritten: {why}", flow)
        for h in held:
            self.released.append((h.token, Pending(flow, d, h.seg, h.out)))

    def expire_held(self, now: float) -> None:
        """Held segments whose line did not complete in time. The first time for a line that
        its segments alone carry, they are dropped and the stream rewound: the sender resends
        them, joined with the rest where TCP coalesces. A second time, or when other lines
        shared the segment, they go unchanged (counted ``partial_line``): never held without
        bound, never wedged."""
        for flow in list(self.holding):
            for d in (C2S, S2C):
                if flow.ahead[d] and now - min(t for _, _, t in flow.ahead[d]) >= AHEAD_TIME:
                    self.counters["reorder_timeout"] += 1
                    self._drain(flow, d, now, force=True)
                held = flow.held[d]
                if not held or now - held[0].since < HOLD_TIME:
                    continue
                start = (held[0].seg.seq + held[0].tail_off) & MASK
                if held[0].tail_off == 0 and flow.dropped_at[d] != start:
                    flow.dropped_at[d] = start
                    flow.held[d] = []
                    stream = flow.streams[d]
                    stream.next_seq, stream.at_line_start = flow.held_snap[d]
                    flow.held_snap[d] = (None, True)
                    self.counters["held_dropped"] += len(held)
                    self.released.extend((h.token, b"") for h in held)
                else:
                    self._release_held(flow, d, "the rest of the line did not come")
        self._prune_holding()

    def _prune_holding(self) -> None:
        self.holding = {f for f in self.holding if any(f.held) or any(f.ahead)}
        self.held_bytes = sum(len(x.seg.payload) for f in self.holding for h in f.held for x in h) + sum(
            len(a[1].payload) for f in self.holding for q in f.ahead for a in q)

    def release_all(self) -> None:
        """Let every held segment go as decided so far (on shutdown)."""
        for flow, d in list(self.flows.values()):
            if d == C2S:
                for direction in (C2S, S2C):
                    self._release_held(flow, direction, "ftpalg is stopping")
                    self.released.extend((token, None) for token, _, _ in flow.ahead[direction])
                    flow.ahead[direction] = []
        self.holding.clear()

    def next_hold_deadline(self) -> float | None:
        """When ``expire_held`` has work to do, if ever (asked at every wake-up of the queue
        loop: looks only at flows that hold something)."""
        self._prune_holding()
        times = [h[0].since for flow in self.holding for h in flow.held if h]
        ahead = [t for flow in self.holding for a in flow.ahead for _, _, t in a]
        deadlines = ([min(times) + HOLD_TIME] if times else []) + ([min(ahead) + AHEAD_TIME] if ahead else [])
        return min(deadlines) if deadlines else None

    # ---- FTP decisions ------------------------------------------------------------------
    def _act(self, flow: Flow, d: int, dec: Decision, spans: list[tuple[int, int, int]], line: bytes,
             now: float) -> bytes:
        """Act on one line; return the line to send. ``spans``: where the line lies, as
        (segment seq, offset in the segment, length) per segment it spans; all but the last
        keep their length in a rewrite, the last carries the change."""
        if dec.problem is not None:
            if dec.problem[0] == "encrypted":
                self._encrypted(flow, dec.problem[1])
            else:
                self._count(dec.problem[0], dec.problem[1], flow)
        if dec.done is not None and self.on_transfer is not None:
            self._transfer_done(flow, dec.done)
        if dec.close is not None:
            self._close_pinhole(flow, dec.close)
        if dec.announce is None or flow.closing:
            return line
        new = self._announce(flow, dec.announce, dec.cmd, line, now)
        if new is line:
            return line
        kept = sum(n for _, _, n in spans[:-1])
        if len(new) < kept:  # shorter than the held part: it cannot keep the held lengths
            self._count("partial_line", "rewritten line shorter than its held part: not rewritten", flow)
            self._close_pinhole(flow, "rewrite not possible")
            return line
        seg_seq = spans[-1][0]
        delta = len(new) - len(line)
        if delta:
            # The kernel's state of this direction, if this process knows it: its own last
            # correction, or what it read since. Any byte of the connection that went by
            # elsewhere (the other gateway of a pair, which may have corrected it too) shows
            # here as a gap first, and the resync forgets it: then it is read again.
            known = flow.kadj[d] if self._adjust_from is not None else None
            try:
                if known is not None:
                    assert self._adjust_from is not None
                    k = self._adjust_from(flow.key, d, seg_seq, delta, known)
                    self.counters["seqadj_reads_skipped"] += 1
                else:
                    k = self.nat.seq_adjust(flow.key, d, seg_seq, delta)
            except Exception as e:  # without it the peer would see shifted bytes: no rewrite
                self._count("no_seq_adjust", f"kernel sequence adjustment refused: {e}", flow)
                self._close_pinhole(flow, "rewrite not possible")
                return line
            prev = flow.kadj[d]
            if prev is not None and k.pos == seg_seq & MASK:
                want = prev.before if prev.pos == k.pos else prev.after
                if k.before != want:  # someone else corrected this connection meanwhile
                    self._forget_history(flow, d)
            if not flow.adj[d].edits:  # what the kernel already shifts this direction by
                flow.adj[d].base = k.before if k.pos == seg_seq & MASK else k.after
            flow.kadj[d] = k
        at = 0
        for i, (sseq, off, n) in enumerate(spans):  # one edit per segment: replays stay exact
            piece = new[at:] if i == len(spans) - 1 else new[at : at + n]
            if piece != line[at : at + n]:
                flow.adj[d].add(sseq + off, n, piece)
            at += n
        self.counters["rewrites"] += 1
        return new

    def _announce(self, flow: Flow, hp: ftp.HostPort, cmd: int, line: bytes, now: float) -> bytes:
        """Open the pinhole an accepted announcement asks for; return the line to send."""
        if flow.mapping is None and not self._learn_mapping(flow, force=True):
            self._count("no_nat_mapping", "conntrack has no entry for the control connection", flow)
            return line
        assert flow.mapping is not None
        m = flow.mapping
        why = policy.refuse_reason(hp, m, self.limits)
        if why:
            self._count("refused", f"{hp.form.name} {hp.addr or ''}:{hp.port}: {why}", flow)
            return line
        lim = self.limits
        if len(self.promised) >= lim.max_pinholes and not self._make_room(m.client):
            self._count("pinhole_cap", f"{len(self.promised)} pinholes open (--max-pinholes): {hp.form.name} "
                                       "opens nothing", flow)
            return line
        if self.per_client[m.client] >= lim.max_pinholes_per_client:
            self._count("client_pinhole_cap", f"client {m.client} has {self.per_client[m.client]} pinholes open "
                                              f"(--max-pinholes-per-client): {hp.form.name} opens nothing", flow)
            return line
        p = policy.plan(hp, m)
        ph = None
        for port in policy.candidate_ports(p.want_port, self.rng):
            if (p.peer, p.public, port) in self.promised:
                continue
            ph = Pinhole(self._next_id, p.peer, p.public, port, p.inside, p.inside_port,
                         now + self.pinhole_timeout, p.snat, flow.key, not hp.form.is_reply, hp.form.name)
            try:
                self.backend.open(ph)
                break
            except PinholeBusy:  # expected by a connection this process does not know of
                self.counters["pinhole_port_busy"] += 1
                ph = None
            except Exception as e:  # the backend's failure must not take the packet with it
                self._count("pinhole_failed", f"{ph.describe()}: {e}", flow)
                return line
        if ph is None:
            self._count("no_free_port", f"no free public port for {p.want_port} in {policy.PORT_TRIES} tries",
                        flow)
            return line
        port = ph.public_port
        self._next_id += 1
        flow.pinhole = flow.last_pinhole = ph
        flow.session.opened(cmd)
        self.promised[(ph.peer, ph.public, ph.public_port)] = ph
        self.per_client[m.client] += 1
        self.counters["pinholes_opened"] += 1
        self.counters[f"announced_{hp.form.name}"] += 1
        same = port == hp.port and (p.announce_addr is None or p.announce_addr == hp.addr)
        new = line if same else ftp.rewrite_line(line, hp, p.announce_addr, port)
        if new != line:
            self.counters[f"rewritten_{hp.form.name}"] += 1
        if log.isEnabledFor(logging.INFO):  # the arguments cost more than the call
            log.info("pinhole open %s flow=%s %s", ph.describe(), key_text(flow.key),
                     f"{line.strip()!r} -> {new.strip()!r}" if new != line else f"{line.strip()!r} unchanged")
        return new

    def _transfer_done(self, flow: Flow, t: Transfer) -> None:
        """One audit record: who transferred what, how, with which outcome."""
        ph = flow.pinhole or flow.last_pinhole
        c, cport, pub, pport = flow.key
        srv = flow.reply_key or flow.key[2:] + flow.key[:2]  # the server's real address, if known
        rec: dict[str, object] = {
            "client": _hostport(addr_text(c), cport),
            "server": _hostport(addr_text(srv[0]), srv[1]),
            "user": flow.session.user.decode("utf-8", "replace"),
            "command": t.verb.decode("ascii", "replace"),
            "path": t.arg.decode("utf-8", "replace"),
            "mode": ph.form if ph else "",
            "data": (f"{ph.peer} -> {_hostport(ph.public, ph.public_port)}"
                     + (f" -> {_hostport(ph.inside, ph.inside_port)}" if ph.dnat else "")) if ph else "",
            "code": t.code,
            "reply": t.text.decode("utf-8", "replace"),
            "outcome": "ok" if 200 <= t.code < 300 else "failed",
        }
        if srv[:2] != (pub, pport):
            rec["server_public"] = _hostport(addr_text(pub), pport)
        try:
            self.on_transfer(rec)  # type: ignore[misc]
        except Exception as e:  # the sink's failure must not take the packet with it
            self._count("audit_failed", f"audit record not written: {e}")

    def _make_room(self, client: str) -> bool:
        """At the pinhole cap: close the oldest pinhole of the client that holds the most,
        if it holds more than ``client`` would with one more (so clients that hold many
        cannot starve one that holds few). Whether room was made."""
        top, n = max(self.per_client.items(), key=lambda kv: kv[1], default=("", 0))
        if n <= self.per_client[client] + 1:
            return False
        victim = min((ph for ph in self.promised.values() if addr_text(ph.master[0]) == top),
                     key=lambda ph: ph.expires, default=None)
        hit = self.flows.get(victim.master) if victim is not None else None
        if hit is None or hit[0].pinhole is not victim:
            return False
        self._close_pinhole(hit[0], "pinhole cap: room made for a client holding fewer")
        self.counters["pinholes_preempted"] += 1
        return True

    def _learn_mapping(self, flow: Flow, force: bool = False) -> bool:
        """Ask conntrack for the control connection's reply tuple (a few tries per flow,
        unless ``force``); index the flow under it for server -> client packets."""
        if flow.lookups >= MAX_LOOKUPS and not force:
            return False
        flow.lookups += 1
        self.counters["nat_lookups"] += 1
        if self._mapping is not None:
            found = self._mapping(flow.key)
            if found is None:
                return False
            reply, corrected = found
            if not corrected and flow.kadj == [None, None]:
                # the kernel holds no correction for it: nothing to read before the first one
                flow.kadj = [KernelAdj(), KernelAdj()]
        else:
            looked_up = self.nat.reply_tuple(flow.key)
            if looked_up is None:
                return False
            reply = looked_up
        flow.reply_key = reply
        flow.mapping = Mapping.from_tuples(flow.key, reply)
        self.flows[reply] = (flow, S2C)
        return True

    # ---- life cycle ---------------------------------------------------------------------
    def _forget_history(self, flow: Flow, d: int) -> None:
        adj = list(flow.adj)
        adj[d] = SeqAdjust()
        flow.adj = (adj[0], adj[1])
        flow.kadj[d] = None
        self.counters["resync"] += 1

    def _resync(self, flow: Flow, why: str) -> None:
        """Bytes of this connection went by without us (through another gateway of a
        failover pair, or while this process was not there): what we remember of it, edits
        and commands alike, is stale. Start over as for a connection picked up mid-stream;
        the kernel's corrections stand."""
        self._close_pinhole(flow, why)
        for d in (C2S, S2C):
            self._forget_history(flow, d)
        encrypted = flow.session.encrypted
        flow.session = Session()
        flow.session.encrypted = encrypted  # TLS stays TLS
        self._log_once(flow, "resync", why + "; history dropped, picked up again")


    def _close_pinhole(self, flow: Flow, why: str) -> None:
        ph = flow.pinhole
        if ph is None:
            return
        flow.pinhole = None
        flow.session.closed()
        self.promised.pop((ph.peer, ph.public, ph.public_port), None)
        client = addr_text(ph.master[0])
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]
        try:
            if self._close_used is not None and "finished" in why:  # its transfer command was answered
                self._close_used(ph)
                self.counters["pinhole_close_unacked"] += 1
            else:
                self.backend.close(ph)
        except Exception as e:
            self._count("pinhole_close_failed", f"{ph.describe()}: {e}", flow)
        self.counters["pinholes_closed"] += 1
        if why == "timeout":
            self.counters["pinholes_expired"] += 1
        elif "finished" in why:  # its transfer command was answered
            self.counters["pinholes_used"] += 1
        log.info("pinhole close id=%d: %s", ph.id, why)

    def _closing(self, flow: Flow, d: int, rst: bool, now: float) -> None:
        flow.fin[d] = True
        self._close_pinhole(flow, "control connection reset" if rst else "control connection closing")
        if rst or all(flow.fin):
            flow.closed_at = now
            if not flow.corrected:  # no late retransmission needs us: forget it now
                self._end(flow, "closed")

    def _end(self, flow: Flow, why: str) -> None:
        self._close_pinhole(flow, why)
        if self.flows.get(flow.key, (None,))[0] is flow:
            self.tracked -= 1
        for k in (flow.key, flow.reply_key):
            if k is not None and self.flows.get(k, (None,))[0] is flow:
                del self.flows[k]

    def _encrypted(self, flow: Flow, detail: str) -> None:
        self.counters["encrypted"] += 1
        if self.counters["encrypted"] == 1:
            log.warning("%s. ftpalg cannot help encrypted control connections (FTPS); through NAT they need "
                        "passive mode with the server's passive port range forwarded and its public address "
                        "configured (vsftpd pasv_address + pasv_min_port/pasv_max_port, proftpd MasqueradeAddress "
                        "+ PassivePorts, pure-ftpd -P/-p), or a TLS-terminating proxy on the gateway. Logged once; "
                        "later ones at info level", detail)
        log.info("encrypted flow=%s: control connection switched to TLS; ftpalg stops reading it", key_text(flow.key))

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

    def snapshot(self, now: float) -> dict[str, object]:
        """What ``ftpalg status`` shows: tracked control connections and open pinholes.
        Safe to call from another thread: it copies the tables first (an atomic copy under
        the GIL) and only reads the flows."""
        flows = [f for f, d in list(self.flows.values()) if d == C2S]
        out = []
        for f in flows:
            m, k = f.mapping, f.kadj
            ph = f.pinhole
            out.append({
                "client": _hostport(addr_text(f.key[0]), f.key[1]),
                "server": _hostport(addr_text(f.reply_key[0]), f.reply_key[1]) if f.reply_key else None,
                "public": _hostport(addr_text(f.key[2]), f.key[3]),
                "client_seen": m.client_seen if m else None,
                "user": f.session.user.decode("utf-8", "replace"),
                "last_command": f.session.last_verb.decode("ascii", "replace"),
                "commands": f.session.count,
                "encrypted": f.session.encrypted,
                "corrections": [None if a is None or not a.active else {"pos": a.pos, "before": a.before,
                                                                          "after": a.after} for a in k],
                "pinhole": None if ph is None else ph.id,
                "idle": round(now - f.last_seen, 1),
                "closing": f.closing,
            })
        holes = [{"id": ph.id, "form": ph.form, "from": ph.peer, "to": _hostport(ph.public, ph.public_port),
                  "dnat": _hostport(ph.inside, ph.inside_port) if ph.dnat else None, "snat": ph.snat,
                  "control": key_text(ph.master), "expires_in": round(ph.expires - now, 1)}
                 for ph in list(self.promised.values())]
        return {"flows": out, "pinholes": holes, "counters": dict(self.counters),
                "tracked": self.tracked, "held_bytes": self.held_bytes}

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
            flow.logged += (reason,)
            log.warning("%s flow=%s: %s", reason, key_text(flow.key), detail)
