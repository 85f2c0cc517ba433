"""The offline run through the real core: the control connections' packets are put back as
a gateway's hook would see them (client side addresses for the client's packets, server
side ones for the server's) and go through the real ``Alg.handle`` with an offline
conntrack (``OfflineNat``) and a pinhole backend that only records (``RecordingPinholes``):
what it opens, rewrites and refuses is the core's own decision, counters and log, kept per
frame as a ``FrameResult``.

Self-contained on purpose: diagnose.py reads a ``FrameResult`` in one place only
(``_core_decision``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from ..core.packet import Segment
from ..core.policy import Limits, addr_text
from ..core.seqadj import KernelAdj
from ..core.table import Alg, FlowKey, Pinhole
from .connections import Session, packed


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
    """What the core did with one frame."""

    opened: list[Pinhole]
    counters: Counter[str]
    messages: list[str]
    changed: bool


def _hook_view(seg: Segment, s: Session, d: int) -> bytes:
    """The packet with the addresses a gateway's hook (before NAT) sees it with."""
    m = s.mapping
    assert m is not None
    src, dst = (m.client, m.public) if d == 0 else (m.server, m.client_seen)
    raw = bytearray(seg.raw)
    n = 4 if seg.version == 4 else 16
    at = 12 if seg.version == 4 else 8
    raw[at : at + n] = packed(src)
    raw[at + n : at + 2 * n] = packed(dst)
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
        nat.table[(packed(m.client), s.cport, packed(m.public), s.sport)] = (
            packed(m.server), s.sport, packed(m.client_seen), s.cport)
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
