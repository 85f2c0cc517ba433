"""The walk of one segment through its connection: ordering (``Direction``), lines
(``Stream`` and the ``Session``), decisions (``Actions``), and the packet to send.

    segment -> ahead of a hole? keep it       (Direction.keep_ahead)
            -> in order: SYN / FIN / RST, held line joined or let go
            -> its new whole lines, each to the session; the decided ones to Actions
            -> a partial line that may carry an address? hold it
            -> the payload decided: encoded when its verdict is handed out (Pending)

``steady`` does the same for the common case in one straight pass: the next segment of a
stream, starting at a line start and ending with a line end, on an open connection with
nothing waiting (USER, 331, TYPE, 200, RETR, 150, 226 ...). ``tests/test_steady.py`` runs
random sessions both ways and compares everything.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from . import ftp
from .actions import Actions, Spans
from .direction import AHEAD_TIME, HOLD_BYTES, HOLD_SEGMENTS, HOLD_TIME, Direction, HeldSeg
from .events import DROPS, HELD, PASS, DropWhy, Held, Reason, Replace, Verdict
from .flow import C2S, Flow
from .packet import ACK, FIN, RST, SYN, DecodeError, Segment, encode
from .policy import Limits
from .seqadj import MASK, Unreplayable, diff
from .session import NOTHING

# A partial line is held for its rest if it may become one of these: an announcement, or a
# command whose reply announces (a PASV split from its 227 would make the 227 unsolicited)
# or changes the session (AUTH).
_PARTIAL_VERBS = (b"PORT", b"EPRT", b"LPRT", b"PASV", b"EPSV", b"LPSV", b"AUTH", b"ALGS")
_PARTIAL_CODES = (b"227", b"228", b"229")
_SLOW = Held()  # ``steady``: not a segment it takes; nothing done, the general walk follows


def tls_record_start(payload: bytes) -> bool:
    """Whether ``payload`` starts like a TLS record (content type 20-23, version 3.x): no FTP
    line starts with these control bytes."""
    return len(payload) >= 5 and 20 <= payload[0] <= 23 and payload[1] == 3 and payload[2] <= 4


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a setattr call per field
class Pending:
    """A decided payload whose packet is encoded only when its verdict is handed out: the
    seq it needs depends on the kernel's correction point at that moment, which a later
    rewrite in the same call may still move."""

    flow: Flow
    d: int
    seg: Segment
    payload: bytes


Decided = Pending | Verdict  # what a packet's verdict will be


def may_announce(flow: Flow, d: int, tail: bytes) -> bool:
    """Whether a partial line could become one that carries an address."""
    session = flow.session
    if session.encrypted:
        return False
    if d == C2S:
        head = tail[:4].upper()
        return any(v.startswith(head) for v in _PARTIAL_VERBS)
    if session.reply_code in ftp.PASSIVE_REPLY_CODES and not session.reply_found:
        return True  # inside a multi-line passive reply: any line may carry the address
    if session.xlat is not None and session.xlat.owed:
        return True  # NAT64: it may be the reply ftpalg replaces
    return any(c.startswith(tail[:3]) for c in _PARTIAL_CODES)


class Waiting:
    """The segments that wait, over all connections: which flows hold some (the timers look
    only there), and how many bytes, under --max-held-bytes."""

    def __init__(self, actions: Actions, limits: Limits) -> None:
        self.actions = actions
        self.limits = limits
        self.holding: set[Flow] = set()
        self.held_bytes = 0  # payload bytes waiting (recounted at each timer)

    def may_hold(self, flow: Flow, size: int) -> bool:
        """Whether ``size`` more bytes may be held back (the --max-held-bytes cap)."""
        if self.held_bytes + size <= self.limits.max_held_bytes:
            self.held_bytes += size
            return True
        self.actions.refuse(Reason.HELD_CAP, f"{self.held_bytes} bytes held (--max-held-bytes): segment not held "
                                             "back", flow)
        return False

    def prune(self) -> None:
        self.holding = {f for f in self.holding if f.waiting}
        self.held_bytes = sum(f.dirs[0].waiting_bytes() + f.dirs[1].waiting_bytes() for f in self.holding)

    def deadline(self) -> float | None:
        """When something waiting is due, if ever."""
        self.prune()
        times = [t for f in self.holding for dr in f.dirs if (t := dr.deadline()) is not None]
        return min(times) if times else None


class Table(Protocol):
    """What the walk asks of the connection table."""

    def end(self, flow: Flow, why: str) -> None: ...
    def remember_syn(self, key: tuple[bytes, int, bytes, int], isn: int) -> None: ...
    def closing(self, flow: Flow, d: int, rst: bool, now: float) -> None: ...


class Walk:
    def __init__(self, actions: Actions, table: Table, counters: Counter[str], limits: Limits,
                 selected: bool = False) -> None:
        self.actions = actions
        self.selected = selected  # only segments that may matter are queued: see ``jump``
        self.table = table
        self.counters = counters
        self.limits = limits
        self.released: list[tuple[object, Decided]] = []  # held packets' verdicts, in order
        self.waiting = Waiting(actions, limits)

    def final(self, x: Decided) -> Verdict:
        return self.finish(x.flow, x.d, x.seg, x.payload) if isinstance(x, Pending) else x

    # ---- the straight pass ---------------------------------------------------------------------
    def steady(self, flow: Flow, d: int, seg: Segment, now: float) -> Verdict:
        """``segment`` -> ``in_order`` -> ``data`` -> ``finish`` for the common case, in the
        same order, without the checks that cannot apply and the objects that carry their
        results. Any other segment: ``_SLOW``, with nothing changed."""
        payload = seg.payload
        dr = flow.dirs[d]
        st = dr.stream
        seq = seg.seq
        session = flow.session
        if self.selected and seq != st.next_seq and payload and not dr.held:
            self.jump(dr, seq)
        if (not payload or payload[-1] != 0x0A or seq != st.next_seq or not st.at_line_start
                or dr.held or dr.ahead or flow.closed_at is not None or flow.dirs[0].fin or flow.dirs[1].fin
                or session.encrypted or (d == C2S and flow.reply_key is None)
                or 20 <= payload[0] <= 23):  # perhaps a TLS record: the general walk
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
                new = self.actions.act(flow, d, dec, [(seq, i, j - i)], line, now)
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
        if self.selected and (flow.following or session.reply_code or session.xlat is not None):
            self.actions.follow(flow)
        if out is payload and not dr.adj.edits:
            return PASS
        return self.finish(flow, d, seg, out)

    def jump(self, dr: Direction, seq: int) -> None:
        """Selected mode: the segments between the last one seen and this one stayed in the
        kernel, each ending with a line end (one that does not is queued): ``seq`` is a line
        start. Older bytes are a retransmission: no jump."""
        if dr.ahead_of_stream(seq):
            dr.follow_from(seq, True)
            self.counters["lines_skipped"] += 1

    # ---- ordering ------------------------------------------------------------------------------
    def segment(self, flow: Flow, d: int, seg: Segment, now: float, token: object = None,
                draining: bool = False) -> Decided:
        dr = flow.dirs[d]
        if self.selected and not draining:
            if seg.payload:
                if dr.held and diff(seg.seq, dr.held_end()) > 0:  # the rest went by unqueued
                    self.release_held(flow, d, "the stream went on without the rest of the line")
                if not dr.held:
                    self.jump(dr, seg.seq)
            out = self._in_order(flow, d, seg, now, token)
            self.actions.follow(flow)
            return out
        if not draining and seg.payload and not seg.flags & (SYN | RST) and dr.ahead_of_stream(seg.seq):
            # a hole before it
            if dr.has_ahead(seg.seq):
                self.counters["ahead_duplicate"] += 1
                return DROPS[DropWhy.DUPLICATE]  # a copy of one kept: the original goes in order
            if dr.keeps_ahead(seg) and not flow.session.encrypted and self.waiting.may_hold(flow, len(seg.payload)):
                dr.keep_ahead(token, seg, now)
                self.waiting.holding.add(flow)
                self.counters["reordered"] += 1
                return HELD
            self.drain(flow, d, now, force=True)  # no room: what waited goes first, as after a gap
        out = self._in_order(flow, d, seg, now, token)
        if draining or not dr.ahead:
            return out
        # what waited for the hole this segment filled goes now, after it, in stream order
        if out is not HELD:
            self.released.append((token, out))
        self.drain(flow, d, now)
        return HELD

    def drain(self, flow: Flow, d: int, now: float, force: bool = False) -> None:
        """Walk the kept segments whose turn has come (all of them if ``force``)."""
        dr = flow.dirs[d]
        while (ready := dr.next_ready(force)) is not None:
            token, seg = ready
            out = self.segment(flow, d, seg, now, token, draining=True)
            if out is not HELD:
                self.released.append((token, out))

    def _in_order(self, flow: Flow, d: int, seg: Segment, now: float, token: object) -> Decided:
        flow.last_seen = now
        flags = seg.flags
        dr = flow.dirs[d]
        if d == C2S and flow.reply_key is None and flags & ACK and not flags & SYN:
            # From the client's first ACK on, conntrack holds the NAT mapping: learning it now
            # lets us follow the server's replies from its greeting on.
            self.actions.learn_mapping(flow)
        if flags & SYN:
            known = flow.dirs[C2S].stream.next_seq
            if d == C2S and not flags & ACK and known is not None and known != (seg.seq + 1) & MASK:
                # a new connection on the same tuple: forget the old one; the new one starts
                # like any other, as a remembered SYN, tracked from its handshake's last ACK
                self.table.end(flow, "reused by a new SYN")
                self.counters["flows_reused"] += 1
                self.table.remember_syn(flow.key, seg.seq)
                return PASS
            if not dr.stream.takes_syn(seg.seq):
                # inside a stream already followed: the receiver drops it (challenge ACK), so
                # neither its payload nor a reset line start may count
                self.actions.refuse(Reason.SYN_MID_STREAM, f"SYN at seq {seg.seq} inside the stream: ignored", flow)
                return PASS
            dr.stream.syn(seg.seq)
            if seg.payload:  # TCP Fast Open data: starts at seq + 1, and no FTP peer sends it
                dr.follow_from(seg.seq + 1 + len(seg.payload), seg.payload.endswith(b"\n"))
                self.actions.refuse(Reason.SYN_DATA, "data on a SYN: not read", flow)
                return PASS
        payload = seg.payload
        out: bytes | Held = payload
        if dr.held and payload:
            end = dr.held_end()
            if diff(seg.seq, end) < 0:  # a copy of a held segment: the original is kept
                self.counters["held_duplicate"] += 1
                return DROPS[DropWhy.DUPLICATE]
            if seg.seq != end or flags & (FIN | RST):
                self.release_held(flow, d, "the stream went on without the rest of the line")
        if payload and not flags & RST:
            try:
                out = self._data(flow, d, seg, payload, now, token)
            except Unreplayable as e:
                self.actions.refuse(Reason.DROPPED_UNREPLAYABLE, str(e), flow)
                return DROPS[DropWhy.UNREPLAYABLE]
        if out is HELD:
            return HELD
        if flags & (FIN | RST):
            self.table.closing(flow, d, bool(flags & RST), now)
        assert isinstance(out, bytes)
        return Pending(flow, d, seg, out)

    def finish(self, flow: Flow, d: int, seg: Segment, out_payload: bytes) -> Verdict:
        """The verdict for ``seg`` with ``out_payload``."""
        seq = seg.seq
        dr = flow.dirs[d]
        if out_payload and dr.adj.edits:
            found = dr.compensate(seg)
            if found is None:
                self.actions.refuse(Reason.DROPPED_UNEXPRESSIBLE, "", flow)
                return DROPS[DropWhy.UNEXPRESSIBLE]
            if found != seq:
                self.counters["seq_compensated"] += 1
                seq = found
        if out_payload == seg.payload and seq == seg.seq:
            return PASS
        self.counters["rewritten_packets"] += 1
        try:
            return Replace(encode(seg, out_payload, seq, seg.ack))
        except DecodeError as e:
            self.actions.refuse(Reason.ENCODE_FAILED, str(e))
            return PASS

    # ---- lines ---------------------------------------------------------------------------------
    def _data(self, flow: Flow, d: int, seg: Segment, payload: bytes, now: float, token: object) -> bytes | Held:
        dr = flow.dirs[d]
        stream = dr.stream
        snap = (stream.next_seq, stream.at_line_start)
        first, consumed = b"", 0  # the end of a line begun in held segments, as it goes out
        if dr.held:
            nl = payload.find(b"\n")
            held = dr.held
            size = sum(len(h.seg.payload) - h.tail_off for h in held) + len(payload)
            if (nl < 0 and len(held) < HOLD_SEGMENTS and size <= HOLD_BYTES
                    and self.waiting.may_hold(flow, len(payload))):
                stream.feed(seg.seq, payload)
                held.append(HeldSeg(token, seg, payload, 0, now))
                self.waiting.holding.add(flow)
                return HELD
            if nl < 0:
                self.release_held(flow, d, "line too long to hold")
            else:
                first, consumed = self._spanning_line(flow, d, seg, payload[: nl + 1], now), nl + 1
        session = flow.session
        if not session.encrypted and tls_record_start(payload) and (
                stream.next_seq is None or diff(seg.seq, stream.next_seq) >= 0):
            # The connection went TLS while this process was not watching (a restart, a gap,
            # the other gateway of a pair): nothing more is read from it.
            session.encrypted = True
            self.actions.encrypted(flow, "TLS record seen on a control connection not known to be encrypted: "
                                         "its PORT/EPRT/227/229 cannot be read or rewritten, nothing is opened for it")
        lines = stream.feed(seg.seq, payload)
        if lines.gap:
            if session.encrypted:  # TLS: no line to miss; the stream just goes on
                self.counters["gap_encrypted"] += 1
            else:
                self.actions.refuse(Reason.GAP, "data before this segment not seen; lines not inspected", flow)
                if flow.corrected or session.count:
                    self.actions.resync(flow, "bytes of the connection passed elsewhere")
                    session = flow.session
        out = dr.adj.replay(seg.seq, payload[: lines.old]) if lines.old else b""
        if len(out) < lines.old or lines.old == len(payload):
            return out if out != payload else payload
        pos = max(lines.old, consumed)
        parts = [out, first]
        follow = flow.reply_key is not None
        for off, line in lines.lines:
            if session.encrypted:  # the rest of the stream is TLS
                break
            dec = session.command(line, follow) if d == C2S else session.reply(line)
            new = self.actions.act(flow, d, dec, [(seg.seq, off, len(line))], line, now) if dec else line
            if new is not line:
                parts.append(payload[pos:off])
                parts.append(new)
                pos = off + len(line)
        parts.append(payload[pos:])
        res = b"".join(parts)
        tail = lines.tail
        if (tail and may_announce(flow, d, tail) and len(tail) <= HOLD_BYTES
                and self.waiting.may_hold(flow, len(payload))):
            # The rest of this line is in a later segment: hold this one until it comes.
            dr.held.append(HeldSeg(token, seg, res, len(payload) - len(tail), now, len(res) - len(tail)))
            self.waiting.holding.add(flow)
            dr.held_snap = snap
            return HELD
        return payload if res == payload else res

    def _spanning_line(self, flow: Flow, d: int, seg: Segment, end: bytes, now: float) -> bytes:
        """A line begun in the held segments ends with ``end`` at the start of ``seg``: act
        on it, send the held segments (each keeps its length; its part of the rewritten line
        goes in its place), and return what replaces ``end`` in ``seg`` (carrying any length
        change, so the kernel's single correction point sits at ``seg``)."""
        held = flow.dirs[d].take_held()
        pieces = [h.seg.payload[h.tail_off:] for h in held]
        line = b"".join(pieces) + end
        session, follow = flow.session, flow.reply_key is not None
        dec = session.command(line, follow) if d == C2S else session.reply(line)
        spans: Spans = [(h.seg.seq, h.tail_off, len(p)) for h, p in zip(held, pieces, strict=True)]
        new = self.actions.act(flow, d, dec, spans + [(seg.seq, 0, len(end))], line, now) if dec else line
        self.counters["lines_assembled"] += 1
        at = 0
        for h, p in zip(held, pieces, strict=True):
            out = h.out[: h.keep] + new[at : at + len(p)]
            at += len(p)
            self.released.append((h.token, Pending(flow, d, h.seg, out)))
        return new[at:]

    def release_held(self, flow: Flow, d: int, why: str) -> None:
        """Let the held segments of direction ``d`` go as decided so far (the partial line
        unchanged), counted."""
        held = flow.dirs[d].take_held()
        if not held:
            return
        self.actions.refuse(Reason.PARTIAL_LINE, f"address-carrying line split across segments not rewritten: {why}",
                            flow)
        for h in held:
            self.released.append((h.token, Pending(flow, d, h.seg, h.out)))

    # ---- timers --------------------------------------------------------------------------------
    def expire(self, now: float) -> None:
        """Segments that waited too long. Kept ahead of a hole that did not fill: they go on
        as after a gap. A held line whose rest did not come: the first time for a line that
        its segments alone carry, they are dropped and the stream rewound (the sender resends
        them, joined with the rest where TCP coalesces); a second time, or when other lines
        shared the segment, they go unchanged (counted ``partial_line``): never held without
        bound, never wedged."""
        for flow in list(self.waiting.holding):
            for d in (0, 1):
                dr = flow.dirs[d]
                if dr.ahead and now - min(t for _, _, t in dr.ahead) >= AHEAD_TIME:
                    self.counters["reorder_timeout"] += 1
                    self.drain(flow, d, now, force=True)
                if not dr.held or now - dr.held[0].since < HOLD_TIME:
                    continue
                if dr.may_rewind():
                    held = dr.rewind()
                    self.counters["held_dropped"] += len(held)
                    self.released.extend((h.token, DROPS[DropWhy.REWOUND]) for h in held)
                else:
                    self.release_held(flow, d, "the rest of the line did not come")
            if self.selected:
                self.actions.follow(flow)
        self.waiting.prune()

    def deadline(self) -> float | None:
        return self.waiting.deadline()

    def release_all(self, flows: list[Flow]) -> None:
        """Let every waiting segment go as decided so far (on shutdown)."""
        for flow in flows:
            for d in (0, 1):
                self.release_held(flow, d, "ftpalg is stopping")
                dr = flow.dirs[d]
                self.released.extend((token, PASS) for token, _, _ in dr.ahead)
                dr.ahead = []
        self.waiting.holding.clear()
