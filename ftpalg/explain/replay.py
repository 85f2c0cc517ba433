"""The offline run through the real core: the control connections' packets are put back as
a gateway's hook would see them (client side addresses for the client's packets, server
side ones for the server's) and go through the real ``Alg.handle`` with the offline kernel
(``core.offline.OfflineKernel``: conntrack as the capture implies it, pinholes only
recorded). What the core decided for each frame is kept as its events (``FrameResult``):
the pinholes it opened, the lines it rewrote, what it refused and why — read, never
re-derived. Each session's counters are those events counted (``core.accounting``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.accounting import Accounting
from ..core.addr import addr_text, packed
from ..core.alg import Alg
from ..core.events import Event, Replace
from ..core.nat64 import Nat64
from ..core.offline import OfflineKernel
from ..core.packet import Segment
from ..core.policy import Limits
from .connections import Session


@dataclass
class FrameResult:
    """What the core decided when one frame came: its events, and whether any packet's
    bytes changed."""

    events: list[Event]
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
             control_ports: frozenset[int], pinhole_timeout: float, nat64: Nat64 | None = None
             ) -> dict[int, FrameResult]:
    """Feed every control segment, as the gateway's hook would see it, to one ``Alg``;
    return what it decided per frame. ``nat64``: the translator whose pool addresses are
    IPv6 clients (their sessions are translated, RFC 6384)."""
    kernel = OfflineKernel()
    ports = frozenset({*control_ports, *(s.sport for s in sessions)})
    alg = Alg(kernel, ports, pinhole_timeout, limits=limits, nat64=nat64)
    by_tuple: dict[tuple[str, int, str, int], tuple[Session, int]] = {}
    for s in sessions:
        m = s.mapping
        assert m is not None
        kernel.table[(packed(m.client), s.cport, packed(m.public), s.sport)] = (
            packed(m.server), s.sport, packed(m.client_seen), s.cport)
        by_tuple[(s.client, s.cport, s.server, s.sport)] = (s, 0)
        by_tuple[(s.server, s.sport, s.client, s.cport)] = (s, 1)
    results: dict[int, FrameResult] = {}
    for no, t, seg in segs:
        hit = by_tuple.get((addr_text(seg.src), seg.sport, addr_text(seg.dst), seg.dport))
        if hit is None:
            continue
        s, d = hit
        alg.on_timer(t)
        alg.drain()  # timers' events belong to no frame
        out = alg.handle(_hook_view(seg, s, d), t, token=no)
        released = alg.take_released()
        changed = isinstance(out, Replace) or any(isinstance(x, Replace) for _, x in released)
        events = alg.drain()
        results[no] = FrameResult(events, changed)
        Accounting(s.counters, logs=False).consume(events)
    alg.release_all()
    alg.take_released()
    alg.shutdown()
    return results
