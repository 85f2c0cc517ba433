"""The core and its kernel back ends for one queue: the whole run (one process), or one
worker. ``engine(cfg)`` builds them, yields an ``Engine`` and takes them down."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from ..config import Config
from ..core.policy import Limits
from ..core.table import Alg
from . import audit
from .conntrack import Conntrack, ExpectationPinholes
from .ctnetlink import CtNetlink
from .kernel import LinuxKernel
from .metrics import LatencyHistogram, MetricsView
from .status import Document


@dataclass(frozen=True, slots=True)
class Engine:
    """The core, and what its queue loop fills for the metrics: each packet's handling time
    and the count of packets by verdict."""

    alg: Alg
    latency: LatencyHistogram
    verdicts: Counter[str]

    def snapshot(self) -> Document:
        """``ftpalg status``'s document."""
        return self.alg.snapshot(time.monotonic())

    def metrics_view(self) -> MetricsView:
        alg, h = self.alg, self.latency
        return MetricsView(dict(alg.counters), dict(self.verdicts), alg.tracked, len(alg.promised), alg.held_bytes,
                           tuple(h.counts), h.total, h.sum_ns)


@contextlib.contextmanager
def engine(cfg: Config, limits: Limits | None = None) -> Iterator[Engine]:
    """The engine of ``cfg`` (``limits``: a worker's share of the caps). On exit the pinholes
    still open are deleted (corrections stay with the kernel) and the sockets and audit file
    closed."""
    nl = CtNetlink()
    kernel = LinuxKernel(nl, cfg.gateway.pinhole_timeout)
    on_transfer, audit_sink = audit.sink(cfg.audit.enabled, cfg.audit.file)
    kwargs = cfg.alg_kwargs()
    if limits is not None:
        kwargs["limits"] = limits
    alg = Alg(Conntrack(kernel), ExpectationPinholes(kernel), on_transfer=on_transfer, **kwargs)
    try:
        yield Engine(alg, LatencyHistogram(), Counter())
    finally:
        if audit_sink is not None:
            audit_sink.close()
        alg.shutdown()
        nl.close()
