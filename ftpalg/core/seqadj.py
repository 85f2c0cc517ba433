"""Sequence-number corrections for one direction of a TCP connection.

Every rewrite of that direction's byte stream is an ``Edit``: ``old_len`` bytes starting at
sender sequence number ``start`` were replaced by ``new``. From the list of edits:

- ``forward(seq)``  maps a sender seq to the seq the receiver sees (seq field of this
  direction's segments);
- ``backward(ack)`` maps a receiver ack (or SACK edge) back to the sender's numbering (ack
  field of the other direction's segments); an ack that falls inside replaced bytes is mapped
  to the start of the edit, so the sender retransmits the whole original line;
- ``replay(seq, payload)`` reapplies edits to a retransmission so it comes out byte-identical
  to what was sent the first time.

All arithmetic is modulo 2**32 with RFC 1982 serial comparison, so wraparound is harmless as
long as edits are within 2**31 bytes of each other (old edits are folded into ``base``).
The state is a few integers and short byte strings: cheap to copy, compare and serialise.
"""

from __future__ import annotations

from dataclasses import dataclass

MASK = 0xFFFFFFFF
HALF = 0x80000000
MAX_EDITS = 16  # older edits are folded into ``base``; their bytes are no longer replayed


def diff(a: int, b: int) -> int:
    """Signed distance a - b in 32-bit serial arithmetic."""
    d = (a - b) & MASK
    return d - (1 << 32) if d >= HALF else d


@dataclass(frozen=True, slots=True)
class Edit:
    start: int  # sender seq of the first replaced byte
    old_len: int
    new: bytes
    before: int  # cumulative delta of all edits before this one

    @property
    def end(self) -> int:
        return (self.start + self.old_len) & MASK

    @property
    def after(self) -> int:
        return self.before + len(self.new) - self.old_len


class Unreplayable(Exception):
    """A retransmission starts inside replaced bytes: it cannot be made identical."""


class SeqAdjust:
    __slots__ = ("edits", "base")

    def __init__(self) -> None:
        self.edits: list[Edit] = []
        self.base = 0  # delta of everything folded away

    @property
    def active(self) -> bool:
        """Whether any correction applies (otherwise numbers pass through unchanged)."""
        return bool(self.edits) or self.base != 0

    @property
    def delta(self) -> int:
        """Current total length change (applies to all new data)."""
        return self.edits[-1].after if self.edits else self.base

    def add(self, start: int, old_len: int, new: bytes) -> None:
        """Record that ``old_len`` bytes at ``start`` became ``new`` (edits must come in
        stream order, each after the previous one)."""
        self.edits.append(Edit(start & MASK, old_len, bytes(new), self.delta))
        if len(self.edits) > MAX_EDITS:
            self.base = self.edits.pop(0).after

    def forward(self, seq: int) -> int:
        for e in reversed(self.edits):
            if diff(seq, e.end) >= 0:
                return (seq + e.after) & MASK
            if diff(seq, e.start) > 0:  # inside an edit: land at its start (see replay)
                return (e.start + e.before) & MASK
        return (seq + (self.edits[0].before if self.edits else self.base)) & MASK

    def backward(self, ack: int) -> int:
        for e in reversed(self.edits):
            new_start = (e.start + e.before) & MASK
            new_end = (new_start + len(e.new)) & MASK
            if diff(ack, new_end) >= 0:
                return (ack - e.after) & MASK
            if diff(ack, new_start) > 0:
                return e.start
        return (ack - (self.edits[0].before if self.edits else self.base)) & MASK

    def replay(self, seq: int, payload: bytes) -> bytes:
        """Apply recorded edits to already-seen bytes [seq, seq+len). Bytes past an edit
        that is only partly covered are cut off (the sender will resend them from the
        edit's start); a segment starting inside an edit raises Unreplayable."""
        if not self.edits:
            return payload
        end = (seq + len(payload)) & MASK
        out = bytearray()
        pos = 0  # offset in payload already copied
        for e in self.edits:
            off = diff(e.start, seq)
            if diff(e.end, seq) <= 0 or diff(e.start, end) >= 0:
                continue  # edit entirely before or after this segment
            if off < 0:
                raise Unreplayable("retransmission starts inside a rewritten line")
            if diff(e.end, end) > 0:  # edit only partly covered: stop before it
                out += payload[pos:off]
                return bytes(out)
            out += payload[pos:off]
            out += e.new
            pos = off + e.old_len
        out += payload[pos:]
        return bytes(out)


@dataclass(frozen=True, slots=True)
class KernelAdj:
    """The kernel's sequence adjustment of one direction of a connection (struct
    nf_ct_seqadj): one correction point; segments up to ``pos`` move by ``before``, later
    ones by ``after``; acks and SACK edges of the other direction move back the same way
    (net/netfilter/nf_conntrack_seqadj.c). A model, so the core can tell what the kernel
    will do with a segment, and tests can play the kernel."""

    pos: int = 0
    before: int = 0  # signed
    after: int = 0

    @property
    def active(self) -> bool:
        return self.before != 0 or self.after != 0

    def add(self, seq: int, delta: int) -> KernelAdj:
        """After the segment starting at ``seq`` grew by ``delta``, as nf_ct_seqadj_set()
        records it: a segment past the point moves the point; an older segment changes
        nothing. Another change in the segment that set the point adds to ``after``: the
        kernel's function would ignore it, ftpalg writes the sum itself (two announcements
        in one segment)."""
        seq &= MASK
        if self.before == self.after or diff(seq, self.pos) > 0:
            return KernelAdj(seq, self.after, self.after + delta)
        if seq == self.pos:
            return KernelAdj(self.pos, self.before, self.after + delta)
        return self

    def corrects(self, seq: int, delta: int) -> bool:
        """Whether this state holds the very correction that the segment starting at ``seq``
        growing by ``delta`` would add: its point at exactly ``seq``, later segments moved
        ``delta`` more. Read from the kernel by a process that did not make it, that is the
        segment's line rewritten before, by the other gateway of a pair or by this gateway
        before a restart, and now retransmitted: to add it again would count its change
        twice (``add`` at the same point adds)."""
        return seq & MASK == self.pos and self.after - self.before == delta

    def seq_offset(self, seq: int) -> int:
        """What the kernel adds to the seq of a segment of this direction."""
        return self.after if diff(seq, self.pos) > 0 else self.before

    def ack_offset(self, ack: int) -> int:
        """What the kernel subtracts from an ack (or SACK edge) of the other direction."""
        return self.after if diff(ack - self.before, self.pos) > 0 else self.before
