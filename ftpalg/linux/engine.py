"""The core and its kernel back ends for one queue: the whole run (one process), or one
worker. ``engine(cfg)`` builds them, yields an ``Engine`` and takes them down."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..core.accounting import Accounting
from ..core.alg import Alg
from ..core.policy import Limits
from . import audit
from .ctnetlink import CtNetlink, ExpectationEvents
from .kernel import LinuxKernel
from .metrics import LatencyHistogram, MetricsView
from .rules import NEEDS, RuleError
from .status import Document
from .stop import restarting


@dataclass(frozen=True, slots=True)
class Engine:
    """The core, the reader of its events (counters, log lines, audit records), and what its
    queue loop fills for the metrics: each packet's handling time and the count of packets by
    verdict."""

    alg: Alg
    accounting: Accounting
    latency: LatencyHistogram
    verdicts: Counter[str]
    # what the queue loop also watches between packets: (file, callback), the callback
    # returning False to stop the loop (the kernel's expectation events, selected mode)
    watch: tuple[tuple[Any, Callable[[], bool]], ...] = ()

    def snapshot(self) -> Document:
        """``ftpalg status``'s document."""
        return self.alg.snapshot(time.monotonic())

    def metrics_view(self) -> MetricsView:
        alg, h = self.alg, self.latency
        return MetricsView(dict(alg.counters), dict(self.verdicts), alg.tracked, len(alg.book), alg.held_bytes,
                           tuple(h.counts), h.total, h.sum_ns)


def expectation_events() -> ExpectationEvents:
    """The kernel's expectation events (selected mode). Joining their group is the first
    thing ``ftpalg run`` does that needs CAP_NET_ADMIN (before the rules): without it, say
    so as the rules would (``rules.NEEDS``)."""
    try:
        return ExpectationEvents()
    except PermissionError as e:
        raise RuleError(f"conntrack expectation events: {e.strerror} ({NEEDS})") from None


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
    alg = Alg(kernel, audit=on_transfer is not None, **kwargs)
    accounting = Accounting(alg.counters, on_transfer)
    events = expectation_events() if alg.selected else None
    watch: tuple[tuple[Any, Callable[[], bool]], ...] = ()
    if events is not None:
        def gone() -> bool:
            """Pinholes the kernel removed (used, or gone with their master): in selected mode
            the replies that end a transfer are not queued, so this is how ftpalg learns it."""
            for pid in kernel.gone(events.read()):
                alg.pinhole_gone(pid)
            accounting.consume(alg.drain())
            return True

        watch = ((events, gone),)
    try:
        yield Engine(alg, accounting, LatencyHistogram(), Counter(), watch)
    finally:
        if restarting():  # the pinholes stay with the kernel (one-shot, timed out); the
            alg.hand_over()  # passive commands awaiting their reply are left in its entries
        else:
            alg.shutdown()
        accounting.consume(alg.drain())  # the pinholes closed at the end, counted and logged
        if audit_sink is not None:
            audit_sink.close()
        if events is not None:
            events.close()
        nl.close()
