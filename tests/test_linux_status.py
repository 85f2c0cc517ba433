"""The status socket and the metrics collector, without a queue or a lab (no packets)."""

from __future__ import annotations

import os
from collections import Counter

import pytest
from needs import need
from prometheus_client import CollectorRegistry, generate_latest

from alg_helpers import Conn, Driven, FakeKernel
from ftpalg.core.alg import Alg
from ftpalg.linux import metrics
from ftpalg.linux.engine import Engine
from ftpalg.linux.status import StatusServer, fetch, render


def session() -> Alg:
    nat = FakeKernel()
    alg = Driven(nat)
    conn = Conn(alg, nat)
    conn.s(b"220 hi\r\n")
    conn.c(b"USER alice\r\n")
    conn.s(b"331 pw\r\n")
    conn.c(b"PORT 10,0,0,2,195,80\r\n")
    return alg


def test_status_socket_answers_a_snapshot_and_renders_it():
    alg = session()
    name = f"@ftpalg-status-test-{os.getpid()}"
    srv = StatusServer(name, lambda: alg.snapshot(10.0))
    srv.start()
    try:
        doc = fetch(name)
    finally:
        srv.stop()
    (flow,) = doc["flows"]
    assert flow["user"] == "alice" and flow["last_command"] == "PORT" and flow["pinhole"] == 1
    (hole,) = doc["pinholes"]
    assert hole["form"] == "PORT" and hole["to"] == "203.0.113.1:50000" and hole["dnat"] == "10.0.0.2:50000"
    text = render(doc)
    assert "alice" in text and "#1" in text and "10.0.0.2:50000" in text
    with pytest.raises(OSError, match="no ftpalg run answers"):
        fetch(name)  # gone with stop()


def test_status_socket_turns_other_users_away():
    need(os.geteuid() == 0, "root (to become another uid)")
    alg = session()
    name = f"@ftpalg-status-test-uid-{os.getpid()}"
    srv = StatusServer(name, lambda: alg.snapshot(10.0))
    srv.start()
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: nobody asks
            os.close(r)
            try:
                os.setuid(65534)
                fetch(name)
                os.write(w, b"answered")
            except OSError as e:
                os.write(w, str(e).encode()[:200])
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        said = os.read(r, 400).decode()
        os.close(r)
    finally:
        srv.stop()
    assert "permission denied" in said


def test_metrics_collector_reads_the_core():
    alg = session()
    latency = metrics.LatencyHistogram()
    for ns in (5_000, 40_000, 2_000_000_000):
        latency.observe(ns)
    reg = CollectorRegistry()
    eng = Engine(alg, alg.accounting, latency, Counter(accepted=7, rewritten=1))
    reg.register(metrics.AlgCollector(eng.metrics_view))
    text = generate_latest(reg).decode()
    for line in ('ftpalg_rewrites_total{form="PORT"} 1.0', "ftpalg_pinholes_open 1.0",
                 'ftpalg_packets_total{verdict="rewritten"} 1.0', 'ftpalg_packet_seconds_bucket{le="1e-05"} 1.0',
                 'ftpalg_packet_seconds_bucket{le="5e-05"} 2.0', 'ftpalg_packet_seconds_bucket{le="+Inf"} 3.0',
                 'ftpalg_refusals_total{reason="refused"} 0.0', "ftpalg_control_connections 1.0"):
        assert line in text, line
    assert metrics.parse_listen("[::1]:9121") == ("::1", 9121)
    with pytest.raises(ValueError):
        metrics.parse_listen("localhost")


def test_workers_states_are_summed_for_status_and_metrics(monkeypatch):
    """What the parent of several workers shows: flows and pinholes of all (each tagged with
    its worker), counters and gauges summed, a worker that did not answer named as such;
    the metrics see the same sums, latency buckets added bucket by bucket."""
    from ftpalg.config import Config, Gateway
    from ftpalg.linux import workers as w

    one, two = session(), session()
    lat1, lat2 = metrics.LatencyHistogram(), metrics.LatencyHistogram()
    lat1.observe(5_000)
    lat2.observe(40_000)
    lat2.observe(40_000)
    states = [w.state(Engine(one, one.accounting, lat1, Counter(accepted=3))),
              w.state(Engine(two, two.accounting, lat2, Counter(accepted=4, rewritten=1)))]
    ws = w.WorkerSet(Config(gateway=Gateway(workers=3)))
    ws.workers = [w._Worker(i, type("P", (), {"pid": 100 + i})(), None) for i in range(3)]
    monkeypatch.setattr(ws, "states", lambda: [states[0], None, states[1]])
    doc = ws.snapshot()
    assert [x["answered"] for x in doc["workers"]] == [True, False, True]
    assert [x["queue"] for x in doc["workers"]] == [2121, 2122, 2123]
    assert doc["tracked"] == 2 and len(doc["pinholes"]) == 2
    assert sorted(f["worker"] for f in doc["flows"]) == [0, 2]
    assert doc["counters"]["rewrites"] == one.counters["rewrites"] + two.counters["rewrites"] == 2
    text = render(doc)
    assert "worker 1 (pid 101, queue 2122): did not answer" in text and "w2#" in text
    reg = CollectorRegistry()
    reg.register(metrics.AlgCollector(ws.metrics_view))
    scrape = generate_latest(reg).decode()
    for line in ('ftpalg_packets_total{verdict="accepted"} 7.0', "ftpalg_pinholes_open 2.0",
                 'ftpalg_packet_seconds_bucket{le="1e-05"} 1.0', 'ftpalg_packet_seconds_bucket{le="+Inf"} 3.0',
                 'ftpalg_rewrites_total{form="PORT"} 2.0', "ftpalg_control_connections 2.0"):
        assert line in scrape, line
    monkeypatch.setattr(ws, "states", lambda: [None, None, None])
    assert "ftpalg_pinholes_open 0.0" in generate_latest(reg).decode()  # nobody answered: zeros, not an error
