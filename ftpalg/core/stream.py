"""Where one direction of a TCP byte stream stands: which bytes of a segment are new, and
which complete lines among them start at a line boundary.

Knows nothing of FTP words or of seq corrections. Lines end at LF (CRLF or bare LF).
A line is reported only if all of it is inside the segment and it starts at a line start;
the partial tail of a segment is reported separately so the caller can count it.
This issue's scope: no buffering of partial lines across segments, no reassembly of
out-of-order data (a gap resynchronises on the next segment and is counted).
"""

from __future__ import annotations

from dataclasses import dataclass

from .seqadj import MASK, diff


@dataclass(slots=True)
class Lines:
    old: int  # bytes at the head of the payload already seen (a retransmission)
    lines: list[tuple[int, bytes]]  # (offset in payload, line incl. LF) of new whole lines
    tail: bytes  # new bytes after the last LF (an incomplete line), if at a line start
    gap: bool  # the segment started beyond the next expected byte


class Stream:
    __slots__ = ("next_seq", "at_line_start", "isn")

    def __init__(self) -> None:
        self.next_seq: int | None = None  # seq after the highest in-order byte seen
        self.at_line_start = True
        self.isn: int | None = None  # seq of this direction's SYN, if seen

    def syn(self, seq: int) -> None:
        self.next_seq = (seq + 1) & MASK
        self.at_line_start = True
        self.isn = seq

    def takes_syn(self, seq: int) -> bool:
        """Whether a SYN at ``seq`` starts (or repeats the start of) this stream; a SYN
        anywhere else in a stream already followed is not one TCP accepts (RFC 5961 §4)."""
        return self.next_seq is None or seq == self.isn

    def feed(self, seq: int, payload: bytes) -> Lines:
        n = len(payload)
        if self.next_seq is None:  # first sight mid-connection: assume a line start
            self.next_seq = seq
        rel = diff(seq, self.next_seq)
        gap = rel > 0
        if gap:  # data missing before this segment: cannot know where lines start
            self.next_seq = (seq + n) & MASK
            self.at_line_start = payload.endswith(b"\n")
            return Lines(0, [], b"", True)
        old = min(-rel, n)
        if old == n:
            return Lines(n, [], b"", False)
        lines: list[tuple[int, bytes]] = []
        i = old
        if old and self.at_line_start != (payload[old - 1] == 0x0A):
            # this copy of bytes already seen disagrees with the first about the line end (TCP
            # keeps one of them, not necessarily the one seen here): resynchronise at the next LF
            self.at_line_start = False
        if not self.at_line_start:
            nl = payload.find(b"\n", i)
            i = n if nl < 0 else nl + 1
        tail = b""
        while i < n:
            nl = payload.find(b"\n", i)
            if nl < 0:
                tail = payload[i:]
                break
            lines.append((i, payload[i : nl + 1]))
            i = nl + 1
        self.next_seq = (seq + n) & MASK
        self.at_line_start = payload.endswith(b"\n")
        return Lines(old, lines, tail, False)
