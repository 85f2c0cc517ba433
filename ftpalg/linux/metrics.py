"""Prometheus metrics, served by prometheus_client's own HTTP thread, off the packet path.

Nothing is updated per packet for this module except the per-packet latency histogram,
which the queue loop fills (a few integer additions); everything else is read from the
core's counters when Prometheus scrapes (a custom collector), so an idle scraper costs
nothing and a busy one never blocks a packet for longer than a dict copy. What a scrape
reads is a ``MetricsView``: one process's (``Engine.metrics_view``), or the workers' summed
by their parent (``MetricsView.total``).
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ..core.events import REFUSALS as _REFUSALS
from ..core.events import Translation

log = logging.getLogger("ftpalg")

# Per-packet handling time, seconds: the upper bounds of the histogram's buckets.
BUCKETS = (10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 10e-3, 100e-3)
# Counters of the core that are refusals or faults, exported by reason: the core's one list
# (core.events.REFUSALS), each counted under its value by core.accounting.
REFUSALS = tuple(r.value for r in _REFUSALS)


class LatencyHistogram:
    """Cumulative histogram in nanoseconds, filled by the packet loop (no locking: ints
    are updated under the GIL, and a scrape that sees one packet half-counted is harmless)."""

    __slots__ = ("bounds", "counts", "total", "sum_ns")

    def __init__(self) -> None:
        self.bounds = [int(b * 1e9) for b in BUCKETS]
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0
        self.sum_ns = 0

    def observe(self, ns: int) -> None:
        self.total += 1
        self.sum_ns += ns
        self.counts[bisect_left(self.bounds, ns)] += 1  # the first bucket whose bound is >= ns


_NO_LATENCY = (0,) * (len(BUCKETS) + 1)


@dataclass(frozen=True, slots=True)
class MetricsView:
    """What a scrape shows, read off the core and its queue loop between packets: the core's
    counters, packets by verdict, control connections tracked, pinholes open, bytes held,
    and the latency histogram (per-bucket counts as ``LatencyHistogram`` keeps them)."""

    counters: Mapping[str, int] = field(default_factory=dict)
    verdicts: Mapping[str, int] = field(default_factory=dict)
    tracked: int = 0
    pinholes_open: int = 0
    held_bytes: int = 0
    latency_counts: tuple[int, ...] = _NO_LATENCY
    latency_total: int = 0
    latency_sum_ns: int = 0

    @staticmethod
    def total(views: Iterable[MetricsView]) -> MetricsView:
        """The sum of several (workers'): counters and gauges added, latency bucket by bucket."""
        counters: Counter[str] = Counter()
        verdicts: Counter[str] = Counter()
        tracked = pinholes = held = total = sum_ns = 0
        counts = list(_NO_LATENCY)
        for v in views:
            counters.update(v.counters)
            verdicts.update(v.verdicts)
            tracked += v.tracked
            pinholes += v.pinholes_open
            held += v.held_bytes
            counts = [a + b for a, b in zip(counts, v.latency_counts, strict=True)]
            total += v.latency_total
            sum_ns += v.latency_sum_ns
        return MetricsView(dict(counters), dict(verdicts), tracked, pinholes, held, tuple(counts), total, sum_ns)


View = Callable[[], MetricsView]


class AlgCollector(Collector):
    """``view()`` gives what to export at each scrape."""

    def __init__(self, view: View) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        v = self.view()
        c = v.counters
        for name, doc, value in (
                ("ftpalg_control_connections", "Control connections tracked now", v.tracked),
                ("ftpalg_pinholes_open", "Pinholes (kernel expectations) open now", v.pinholes_open),
                ("ftpalg_held_bytes", "Bytes of segments held back (split lines, reordering)", v.held_bytes)):
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("ftpalg_control_connections", "Control connections tracked since start",
                                  value=c.get("flows", 0))
        m = CounterMetricFamily("ftpalg_rewrites", "Address-carrying lines rewritten, by form", labels=["form"])
        for k, n in sorted(c.items()):
            if k.startswith("rewritten_") and not k.startswith("rewritten_packets"):
                m.add_metric([k.removeprefix("rewritten_")], n)
        yield m
        m = CounterMetricFamily("ftpalg_nat64_translations", "Lines translated for IPv6 clients behind NAT64 "
                                "(RFC 6384), by what was done", labels=["kind"])
        for kind in Translation:
            m.add_metric([kind.value], c.get(f"nat64_{kind.value}", 0))
        yield m
        m = CounterMetricFamily("ftpalg_pinholes", "Pinholes by what happened to them", labels=["event"])
        for event, key in (("opened", "pinholes_opened"), ("used", "pinholes_used"),
                           ("expired", "pinholes_expired"), ("closed", "pinholes_closed")):
            m.add_metric([event], c.get(key, 0))
        yield m
        m = CounterMetricFamily("ftpalg_packets", "Queued packets by verdict", labels=["verdict"])
        for verdict, n in sorted(v.verdicts.items()):
            m.add_metric([verdict], n)
        yield m
        m = CounterMetricFamily("ftpalg_refusals", "Packets or lines not acted on, by reason", labels=["reason"])
        for reason in REFUSALS:
            m.add_metric([reason], c.get(reason, 0))
        yield m
        yield CounterMetricFamily("ftpalg_faults", "Unexpected exceptions while handling a packet (packet accepted)",
                                  value=c.get("faults", 0))
        m = CounterMetricFamily("ftpalg_events", "Every counter of the core, by name", labels=["event"])
        for k, n in sorted(c.items()):
            m.add_metric([k], n)
        yield m
        buckets, acc = [], 0
        for bound, n in zip(BUCKETS, v.latency_counts, strict=False):
            acc += n
            buckets.append((repr(bound), acc))
        buckets.append(("+Inf", v.latency_total))
        hist = HistogramMetricFamily("ftpalg_packet_seconds", "Time to handle one queued packet")
        hist.add_metric([], buckets, v.latency_sum_ns / 1e9)
        yield hist


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"metrics address {listen!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve(listen: str, view: View) -> WSGIServer:
    """Start the endpoint; return its server (``shutdown()`` on exit)."""
    host, port = parse_listen(listen)
    registry = CollectorRegistry()
    registry.register(AlgCollector(view))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s/metrics", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return server
