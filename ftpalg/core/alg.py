"""The connection table: every tracked FTP control connection of one gateway, and the
entry of each packet.

    raw packet -> decode -> which connection (by key; a new one from its handshake)
               -> Walk (ordering, lines, decisions) -> Verdict
    after it:    take_released() (held packets let go), drain() (what was decided)
    timers:      next_deadline(), on_timer(now)

The table decides which packets start, continue or end a tracked connection: a SYN costs
an entry in a bounded FIFO, not a ``Flow``; a connection is tracked from its handshake's
last ACK (or from any segment with data: one met in the middle), indexed under its
original tuple and, once conntrack told, its reply tuple. At ``--max-flows`` the least
recently seen idle connections are forgotten (and picked up again mid-stream if seen).
Nothing here does I/O: the kernel is a port given to the constructor (``kernel.Kernel``).
"""

from __future__ import annotations

import random
import re
from collections import Counter, OrderedDict

from . import policy
from .actions import Actions
from .addr import FlowKey, addr_text, hostport, key_text
from .events import DROPS, HELD, PASS, Close, Closing, DropWhy, Event, Reason, Verdict
from .flow import C2S, S2C, Flow
from .kernel import Kernel, NotForwarded, Pinhole
from .nat64 import Nat64
from .packet import ACK, FIN, RST, SYN, DecodeError, decode
from .pinholes import PinholeBook
from .policy import Limits
from .seqadj import diff
from .walk import _SLOW, Walk

CLOSE_GRACE = 60.0  # keep corrections this long after both FINs (late retransmissions)
IDLE_CHECK = 600.0  # idle flows older than this are dropped once conntrack forgot them
# Selected mode: a connection's RST is not queued (nor a FIN that the queue lost), so its end is
# learnt from conntrack: a flow idle this long is looked up (one netlink request) at each
# sweep, and forgotten once gone.
IDLE_CHECK_SELECTED = 30.0
TICK = 1.0  # seconds between sweeps of the table (pinhole expiry, ended connections)
REUSE_WINDOW = 1 << 24  # how far behind a closed stream's end a late retransmission may start
EVICT_SHARE = 16  # at the flow cap, forget this share of the tracked flows (least recently seen)
PASSING_CAP = 4096  # connections not forwarded by this host remembered (both tuples each), oldest forgotten
_CTL = SYN | FIN | RST | ACK
_PASSIVE = re.compile(rb"22[789]")  # a passive reply's code, somewhere in a server segment
_RESET = Closing(Close.CONTROL_RESET, "control connection reset")
_FIN = Closing(Close.CONTROL_CLOSING, "control connection closing")
_EXPIRED = Closing(Close.EXPIRED, "timeout")
_GONE = Closing(Close.USED, "used (the kernel removed it)")


class Alg:
    """All tracked control connections of one gateway."""

    def __init__(self, kernel: Kernel, control_ports: frozenset[int] = frozenset({21}),
                 pinhole_timeout: float = 120.0, rng: random.Random | None = None,
                 limits: Limits = policy.DEFAULT_LIMITS, audit: bool = False, selected: bool = False,
                 nat64: Nat64 | None = None) -> None:
        self.kernel = kernel
        self.limits = limits
        self.control_ports = control_ports
        self.pinhole_timeout = pinhole_timeout
        self.flows: dict[FlowKey, tuple[Flow, int]] = {}
        self.counters: Counter[str] = Counter()  # statistics; ``Accounting`` adds the decisions
        self.book = PinholeBook(limits)
        self.actions = Actions(kernel, self.book, self.flows, self.counters, limits, pinhole_timeout,
                               rng or random.SystemRandom(), audit)
        self.events: list[Event] = self.actions.events  # what was decided, until ``drain``
        self.selected = selected  # the kernel queues only segments that may matter (rules.py)
        self.nat64 = nat64  # the NAT64 translator's pools: connections from them are translated (RFC 6384)
        self.walk = Walk(self.actions, self, self.counters, limits, selected)
        # Client ISNs of handshakes not yet complete: a SYN costs an entry here, not a Flow
        # (a SYN flood fills this bounded FIFO and nothing else).
        self.syns: OrderedDict[FlowKey, int] = OrderedDict()
        # Where the client streams of flows forgotten at the flow cap stood (next seq, at a line
        # start): a flow seen again continues from there, not from a guess.
        self.evicted: OrderedDict[FlowKey, tuple[int | None, bool]] = OrderedDict()
        self.tracked = 0  # flows (control connections) in ``flows``
        # Control connections this host did not forward (kernel.NotForwarded: opened on the
        # gateway itself): tuple -> the other direction's tuple; their packets pass untouched,
        # said once (``Reason.NOT_FORWARDED``), until their FIN or RST.
        self.passing: dict[FlowKey, FlowKey] = {}
        self._next_tick = 0.0

    def drain(self) -> list[Event]:
        """What the core decided since the last call, in order (``events`` is the same list,
        emptied here: a caller looks at it after each packet, without a call)."""
        out = self.events[:]
        self.events.clear()
        return out

    def take_released(self) -> list[tuple[object, Verdict]]:
        """Verdicts for held packets (token, verdict), to apply before the verdict of the
        packet just handled, in this order."""
        walk = self.walk
        if not walk.released:  # the usual case (asked after every packet): nothing was held
            return []
        out, walk.released = walk.released, []
        return [(token, walk.final(x)) for token, x in out]

    # ---- per packet ---------------------------------------------------------------------------
    def handle(self, raw: bytes, now: float, token: object = None) -> Verdict:
        """Process one IP packet; its verdict (HELD: it comes back through ``take_released``,
        identified by ``token``)."""
        self.counters["packets"] += 1
        try:
            seg = decode(raw)
        except DecodeError as e:
            self.actions.refuse(Reason.UNDECODABLE, str(e))
            return PASS
        key: FlowKey = (seg.src, seg.sport, seg.dst, seg.dport)
        hit = self.flows.get(key)
        if hit is not None and seg.flags & _CTL == ACK and not seg.truncated:
            out = self.walk.steady(hit[0], hit[1], seg, now)
            if out is not _SLOW:
                return out
        if hit is None and key in self.passing:
            if seg.flags & (FIN | RST):
                self.passing.pop(self.passing.pop(key), None)
            return PASS
        if seg.truncated:  # cannot be rewritten: a copy must never be sent back for a packet
            self.actions.refuse(Reason.TRUNCATED, f"copy {len(raw)} of {seg.total_len} bytes")
            if hit is not None and hit[0].corrected:
                # Unchanged, its seq/ack would contradict the corrected stream: drop it and
                # let TCP resend (a resent segment is not coalesced, so it fits).
                self.actions.refuse(Reason.DROPPED_TRUNCATED, "", hit[0])
                return DROPS[DropWhy.TRUNCATED]
            return PASS
        if hit is None and seg.dport not in self.control_ports:
            # server -> client of a connection not followed yet: one this process met first from
            # the server's side (it started, or was restarted, while the client's commands went
            # by). Followed from here only for a passive reply, which needs it; any other reply
            # passes (a flood of unknown connections' greetings costs no flow and no look-up).
            if not (seg.sport in self.control_ports and not seg.flags & (SYN | RST) and _PASSIVE.search(seg.payload)):
                return PASS
            hit = self._pick_up_by_reply(key, now, seg.ack if seg.flags & ACK else None)
            if hit is None:
                return PASS
        elif hit is None:
            flags = seg.flags
            if flags & SYN:
                if not flags & ACK:
                    self.remember_syn(key, seg.seq)
                return PASS
            isn = self.syns.pop(key, None)
            if flags & (FIN | RST) or (isn is None and not seg.payload):
                return PASS  # nothing to follow: the end of a connection, or a bare ACK
            new = self._new_flow(key, now, seg.seq)
            if new is None:
                return PASS
            if isn is not None:
                new.dirs[C2S].stream.syn(isn)
            hit = (new, C2S)
        elif seg.payload and not seg.flags & (SYN | RST) and self._reused(*hit, seg.seq):
            # Data beyond the end of a connection we still remember (kept for its late
            # retransmissions): a new connection reused the tuple and its SYN did not come
            # through us (it bypassed a full queue, or came while we were away). The old
            # flow's state (closing, mapping, edits) is not this one's: start afresh.
            self.end(hit[0], "tuple reused by a connection whose SYN was not seen")
            self.counters["flows_reused"] += 1
            if hit[1] != C2S:
                return PASS  # server data of a connection not tracked yet: nothing to adjust
            new = self._new_flow(key, now)
            if new is None:
                return PASS
            hit = (new, C2S)
        res = self.walk.segment(hit[0], hit[1], seg, now, token)
        if hit[0].passing is not None and res is not HELD and not hit[0].waiting:
            self._let_pass(hit[0], hit[0].passing)
        return HELD if res is HELD else self.walk.final(res)

    def _pick_up_by_reply(self, reply: FlowKey, now: float, ack: int | None) -> tuple[Flow, int] | None:
        """Follow the connection whose reply tuple is ``reply`` from this server segment on
        (conntrack knows it; at the flow cap it passes untouched). The segment's ``ack`` says
        where the client's stream stands: bytes before it reached the server already (a
        client's late retransmission of an answered command is not a new command)."""
        if self.tracked >= self.limits.max_flows:
            return None
        self.counters["nat_lookups"] += 1
        try:
            found = self.kernel.by_reply(reply)
        except NotForwarded as e:
            self.actions.not_forwarded(e.other)
            self._remember_passing(e.other, reply)
            return None
        if found is None:
            return None
        orig, corrected, awaiting = found
        hit = self.flows.get(orig)
        flow = hit[0] if hit is not None else self._new_flow(orig, now)
        if flow is None:
            return None
        self.actions.index_reply(flow, reply, corrected)
        if hit is None and ack is not None and not corrected:  # (with corrections, the server's
            flow.dirs[C2S].follow_from(ack, True)  # numbering is not the client's)
        if awaiting:  # handed over by the ftpalg before this one (``hand_over``): now known here
            flow.session.resume(awaiting)
            self.actions.hand_over(flow, b"")
        return flow, S2C

    def _let_pass(self, flow: Flow, reply: FlowKey) -> None:
        """Forget a flow this host did not forward; its packets pass untouched from now on."""
        self.end(flow, "not forwarded by this host")
        self._remember_passing(flow.key, reply)

    def _remember_passing(self, orig: FlowKey, reply: FlowKey) -> None:
        passing = self.passing
        while len(passing) >= 2 * PASSING_CAP:
            passing.pop(next(iter(passing)))
        passing[orig], passing[reply] = reply, orig

    @staticmethod
    def _reused(flow: Flow, d: int, seq: int) -> bool:
        """Whether a segment with data at ``seq`` cannot belong to ``flow``'s connection,
        which is closing (a FIN seen, or a RST): it starts beyond where that direction's
        stream has come (a hole: a closing connection's peer has nothing more to say), or at
        that point after this direction's own FIN or a reset, or far behind it (not a late
        retransmission): a new connection's random ISN. A half-closed connection's other
        direction, in order, goes on as before."""
        if not flow.closing:
            return False
        nxt = flow.dirs[d].stream.next_seq
        if nxt is None:
            return False
        off = diff(seq, nxt)
        return off > 0 or off < -REUSE_WINDOW or (off == 0 and (flow.dirs[d].fin or flow.closed_at is not None))

    # ---- the table --------------------------------------------------------------------------
    def remember_syn(self, key: FlowKey, isn: int) -> None:
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
            self.actions.refuse(Reason.FLOW_CAP, f"{self.tracked} control connections tracked (--max-flows): "
                                                 "a new one passes untouched, without pinholes")
            return None
        flow = Flow(key, now, self.selected, self.nat64.state(key[0]) if self.nat64 is not None else None)
        where = self.evicted.pop(key, None)
        if where is not None and seq is not None:
            # Forgotten at the flow cap, seen again at a client segment: if it is the very next
            # one, the client's stream goes on from where it stood; if bytes passed meanwhile
            # (not tracked at the cap), where lines start is unknown until the next line end.
            # The server's stream starts afresh: its replies passed unwatched meanwhile.
            # Selected mode: the segments between stayed in the kernel, each ending with a line
            # end (see Walk.jump), and a new connection on the tuple shows no SYN: a segment
            # that is not the very next one starts a line.
            nxt, start = where
            flow.dirs[C2S].follow_from(seq, start if nxt == seq else self.selected)
        self.flows[key] = (flow, C2S)
        self.tracked += 1
        self.counters["flows"] += 1
        return flow

    def _evict(self) -> int:
        """Forget the least recently seen flows that have no live pinhole and hold nothing,
        those without corrections first (the kernel keeps corrections anyway; only the
        history for exact retransmissions goes). A flow forgotten and seen again is picked
        up mid-stream, as after a restart."""
        holding = self.walk.waiting.holding
        victims = sorted((f for f, d in self.flows.values() if d == C2S and f.pinhole is None and f not in holding),
                         key=lambda f: (f.corrected, f.last_seen))
        victims = victims[: max(1, self.limits.max_flows // EVICT_SHARE)]
        for f in victims:
            self.end(f, "evicted at the flow cap")
            st = f.dirs[C2S].stream
            self.evicted[f.key] = (st.next_seq, st.at_line_start)
            if len(self.evicted) > 2 * self.limits.max_flows:
                self.evicted.popitem(last=False)
        if victims:
            self.actions.evicted(len(victims))
        return len(victims)

    def closing(self, flow: Flow, d: int, rst: bool, now: float) -> None:
        """A FIN or RST of direction ``d``."""
        flow.dirs[d].fin = True
        self.actions.close_pinhole(flow, _RESET if rst else _FIN)
        if rst or (flow.dirs[0].fin and flow.dirs[1].fin):
            flow.closed_at = now
            # No late retransmission needs us: forget it now. Selected mode, corrected or not:
            # the peers answered everything before their FINs, and a new connection on the
            # tuple (no SYN queued to tell) must not be taken for this one's retransmission.
            if not flow.corrected or self.selected:
                self.end(flow, "closed")

    def end(self, flow: Flow, why: str) -> None:
        """Forget ``flow`` (its pinhole closed; the kernel keeps its corrections)."""
        self.actions.close_pinhole(flow, Closing(Close.ENDED, why))
        if self.flows.get(flow.key, (None,))[0] is flow:
            self.tracked -= 1
        for k in (flow.key, flow.reply_key):
            if k is not None and self.flows.get(k, (None,))[0] is flow:
                del self.flows[k]

    def _connections(self) -> list[Flow]:
        return [f for f, d in list(self.flows.values()) if d == C2S]

    # ---- timers -------------------------------------------------------------------------------
    def next_deadline(self) -> float:
        """When ``on_timer`` has work to do next: a waiting segment's, or the next sweep."""
        hold = self.walk.deadline()
        return self._next_tick if hold is None else min(hold, self._next_tick)

    def on_timer(self, now: float) -> None:
        """What is due at ``now``: waiting segments let go or dropped, and (once a TICK)
        pinholes expired and ended connections forgotten."""
        hold = self.walk.deadline()
        if hold is not None and now >= hold:
            self.walk.expire(now)
        if now >= self._next_tick:
            self.tick(now)
            self._next_tick = now + TICK

    def expire_held(self, now: float) -> None:
        """The waiting segments' part of ``on_timer``, whatever the time."""
        self.walk.expire(now)

    def tick(self, now: float) -> None:
        """The sweep's part of ``on_timer``, whatever the time: expire pinholes and forget
        finished or vanished connections."""
        for flow in self._connections():
            if flow.pinhole is not None and flow.pinhole.expires <= now:
                self.actions.close_pinhole(flow, _EXPIRED)
            if flow.closed_at is not None and now - flow.closed_at >= CLOSE_GRACE:
                self.end(flow, "closed")
            elif now - flow.last_seen >= (IDLE_CHECK_SELECTED if self.selected else IDLE_CHECK):
                if not flow.corrected and not self.selected:
                    self.end(flow, "idle")
                elif self.kernel.mapping(flow.key) is None:
                    self.end(flow, "gone from conntrack")
                else:
                    flow.last_seen = now

    def pinhole_gone(self, pinhole_id: int) -> None:
        """The kernel no longer holds the pinhole (its data connection used it, or its
        control connection ended): closed as used, nothing withdrawn."""
        ph = self.book.by_id(pinhole_id)
        hit = self.flows.get(ph.master) if ph is not None else None
        if hit is not None and hit[0].pinhole is ph:
            self.actions.close_pinhole(hit[0], _GONE, withdraw=False)

    def release_all(self) -> None:
        """Let every waiting segment go as decided so far (on shutdown)."""
        self.walk.release_all(self._connections())

    def hand_over(self) -> None:
        """Stopping for a restart: leave in the kernel, for the next ftpalg, which connections
        wait for the reply to a passive command (PASV, EPSV, LPSV). That reply announces the
        server's address; the next ftpalg meets it first and, by the gating of passive
        replies, would otherwise not take it as solicited (the client's command was seen by
        this one). The pinholes and corrections stay with the kernel anyway."""
        for flow in self._connections():
            verb = flow.session.awaiting()
            if verb:
                self.actions.hand_over(flow, verb)

    def shutdown(self) -> None:
        """Close every pinhole (flows are kept in memory only)."""
        for flow in self._connections():
            self.end(flow, "shutdown")

    # ---- for people ---------------------------------------------------------------------------
    @property
    def promised(self) -> dict[tuple[str, str, int], Pinhole]:
        return self.book.promised

    @property
    def per_client(self) -> Counter[str]:
        return self.book.per_client

    @property
    def held_bytes(self) -> int:
        return self.walk.waiting.held_bytes

    def snapshot(self, now: float) -> dict[str, object]:
        """What ``ftpalg status`` shows: tracked control connections and open pinholes.
        Safe to call from another thread: it copies the tables first (an atomic copy under
        the GIL) and only reads the flows."""
        out = []
        for f in self._connections():
            m = f.mapping
            ph = f.pinhole
            out.append({
                "client": hostport(addr_text(f.key[0]), f.key[1]),
                "server": hostport(addr_text(f.reply_key[0]), f.reply_key[1]) if f.reply_key else None,
                "public": hostport(addr_text(f.key[2]), f.key[3]),
                "client_seen": m.client_seen if m else None,
                "user": f.session.user.decode("utf-8", "replace"),
                "last_command": f.session.last_verb.decode("ascii", "replace"),
                "commands": f.session.count,
                "encrypted": f.session.encrypted,
                "nat64": None if (x := f.session.xlat) is None else {
                    "pool_address": x.client, "client6": x.client6 or None, "enabled": x.enabled,
                    "translated": x.translated},
                "corrections": [None if (a := dr.kadj) is None or not a.active else
                                {"pos": a.pos, "before": a.before, "after": a.after} for dr in f.dirs],
                "pinhole": None if ph is None else ph.id,
                "idle": round(now - f.last_seen, 1),
                "closing": f.closing,
            })
        holes = [{"id": ph.id, "form": ph.form, "from": ph.peer, "to": hostport(ph.public, ph.public_port),
                  "dnat": hostport(ph.inside, ph.inside_port) if ph.dnat else None, "snat": ph.snat,
                  "control": key_text(ph.master), "expires_in": round(ph.expires - now, 1)}
                 for ph in list(self.book.promised.values())]
        return {"flows": out, "pinholes": holes, "counters": dict(self.counters),
                "tracked": self.tracked, "held_bytes": self.walk.waiting.held_bytes}
