"""One direction of a control connection, as TCP sees it: where its byte stream stands,
the segments that wait (kept ahead of a hole, or held for the rest of a line), its FIN,
and the history of edits this process made to it with the kernel's correction.

It knows nothing of FTP words: the walk (``walk.py``) asks it where a segment falls and
which waiting segments became next, and tells it what was rewritten. It can be followed
from any point of its stream, not only from its SYN: ``follow_from`` starts it at a
sequence number (a connection met in the middle, or picked up again after the flow cap).

Sequence numbers are the kernel's job (seqadj): one correction point per direction. The
history here serves to replay retransmitted bytes identically and to find the seq that
lands a retransmission older than the kernel's correction point where it belongs
(``compensate``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .packet import Segment
from .seqadj import MASK, KernelAdj, SeqAdjust, diff
from .stream import Stream

# Segments that arrived ahead of the stream are kept until the hole fills: at most this many,
# this far ahead, this long. The hole is a segment lost on the way to us more often than one
# reordered: it comes back with the sender's retransmission, after 200 + 400 + 800 ms of
# back-off when lost three times in a row.
AHEAD_TIME = 2.0
AHEAD_SEGMENTS = 8
AHEAD_BYTES = 16384  # how far ahead of the stream such a segment may start
# Seconds a segment ending inside a line may wait for the rest. Longer than a sender's
# retransmission timeout (Linux: 200 ms minimum once it has an RTT sample): a sender that
# delays small writes (Nagle) sends the rest only when the first part is acknowledged or its
# timer fires, and then sends it (or a copy of the first part, which is dropped) while the
# first part still waits here.
HOLD_TIME = 0.5
HOLD_BYTES = 512  # the longest partial line held
HOLD_SEGMENTS = 4  # the most segments one line may span


@dataclass(slots=True)
class HeldSeg:
    """A segment that ends inside a line which may carry an address, waiting for the rest."""

    token: object  # the caller's handle of the queued packet
    seg: Segment
    out: bytes  # its payload as far as decided: lines before the partial one, rewritten
    tail_off: int  # where the partial line starts in the payload as it came
    since: float
    keep: int = 0  # where it starts in ``out`` (earlier lines may have been rewritten)


class Direction:
    __slots__ = ("stream", "adj", "kadj", "fin", "held", "held_snap", "dropped_at", "ahead")

    def __init__(self) -> None:
        self.stream = Stream()
        self.adj = SeqAdjust()  # this process's edits, for exact replays
        self.kadj: KernelAdj | None = None  # the kernel's correction, when known
        self.fin = False
        self.held: list[HeldSeg] = []  # segments of one partial line, in order
        self.held_snap: tuple[int | None, bool] = (None, True)  # the stream before them
        self.dropped_at: int | None = None  # line start whose segments were dropped once
        self.ahead: list[tuple[object, Segment, float]] = []  # beyond a hole, in stream order

    # ---- where a segment falls -------------------------------------------------------------
    def follow_from(self, seq: int, at_line_start: bool) -> None:
        """Follow the stream from ``seq`` on (met mid-stream): lines start there if
        ``at_line_start``, otherwise after the next line end."""
        self.stream.next_seq, self.stream.at_line_start = seq & MASK, at_line_start

    def ahead_of_stream(self, seq: int) -> bool:
        nxt = self.stream.next_seq
        return nxt is not None and diff(seq, nxt) > 0

    def keeps_ahead(self, seg: Segment) -> bool:
        """Whether ``seg``, ahead of the stream, fits among the kept segments."""
        nxt = self.stream.next_seq
        return nxt is not None and len(self.ahead) < AHEAD_SEGMENTS and diff(seg.seq, nxt) <= AHEAD_BYTES

    def has_ahead(self, seq: int) -> bool:
        return any(a.seq == seq for _, a, _ in self.ahead)

    def keep_ahead(self, token: object, seg: Segment, now: float) -> None:
        nxt = self.stream.next_seq
        self.ahead.append((token, seg, now))
        self.ahead.sort(key=lambda a: diff(a[1].seq, nxt or 0))

    def next_ready(self, force: bool) -> tuple[object, Segment] | None:
        """The kept segment whose turn has come (any, if ``force``: the hole did not fill in
        time, and they go on as after a gap), taken out; None if none."""
        if not self.ahead:
            return None
        nxt = self.stream.next_seq
        token, seg, _ = self.ahead[0]
        if not force and nxt is not None and diff(seg.seq, nxt) > 0:
            return None
        del self.ahead[0]
        return token, seg

    def held_end(self) -> int:
        last = self.held[-1].seg
        return (last.seq + len(last.payload)) & MASK

    def take_held(self) -> list[HeldSeg]:
        """The held segments, no longer held."""
        held, self.held = self.held, []
        self.held_snap = (None, True)
        return held

    def rewind(self) -> list[HeldSeg]:
        """Drop the held segments and put the stream back where it stood before them: the
        sender resends them, joined with the rest where TCP coalesces. Once per line start."""
        held = self.held
        self.dropped_at = (held[0].seg.seq + held[0].tail_off) & MASK
        self.held = []
        self.stream.next_seq, self.stream.at_line_start = self.held_snap
        self.held_snap = (None, True)
        return held

    def may_rewind(self) -> bool:
        """Whether the held line may be dropped to be resent: only a line that its held
        segments alone carry, and not twice for the same line start."""
        h = self.held[0]
        return h.tail_off == 0 and self.dropped_at != (h.seg.seq + h.tail_off) & MASK

    def waiting_bytes(self) -> int:
        return sum(len(h.seg.payload) for h in self.held) + sum(len(a[1].payload) for a in self.ahead)

    def deadline(self) -> float | None:
        """When something waiting here is due: a held line's rest, or a hole's filling."""
        times = []
        if self.held:
            times.append(self.held[0].since + HOLD_TIME)
        if self.ahead:
            times.append(min(t for _, _, t in self.ahead) + AHEAD_TIME)
        return min(times) if times else None

    # ---- sequence numbers ------------------------------------------------------------------
    def forget_history(self) -> None:
        """Bytes of this direction passed elsewhere: the edits and the kernel state read are
        stale (the kernel's corrections themselves stand)."""
        self.adj = SeqAdjust()
        self.kadj = None

    def compensate(self, seg: Segment) -> int | None:
        """The seq to send so that, after the kernel's adjustment, the segment lands where
        this process's edit history says it belongs; None if no seq can (drop it: TCP resends,
        or the receiver already has those bytes). The kernel keeps one correction point per
        direction and shifts a segment by ``before`` up to it and ``after`` beyond: wrong for
        a retransmission from before the last rewrite (two rewrites in flight, or a held
        segment let go after the next rewrite moved the point), and impossible to get right
        for one that starts after the point but before the edit (part of a segment resent).
        Only segments the history covers are touched (after a restart it starts empty)."""
        k = self.kadj
        adj = self.adj
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
                return x
        return None

    def corrected_by_kernel(self, k: KernelAdj, seg_seq: int) -> bool:
        """Record the kernel's state after a correction made at ``seg_seq``; return False if
        it shows that someone else corrected this direction meanwhile (history now stale)."""
        prev = self.kadj
        fresh = True
        if prev is not None and k.pos == seg_seq & MASK:
            want = prev.before if prev.pos == k.pos else prev.after
            fresh = k.before == want
        return fresh
