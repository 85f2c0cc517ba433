"""The status socket and the metrics collector, without a queue or a lab (no packets)."""

from __future__ import annotations

import os

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from alg_helpers import Conn, FakeNat, FakePinholes
from ftpalg.core.table import Alg
from ftpalg.linux import metrics
from ftpalg.linux.status import StatusServer, fetch, render


def session() -> Alg:
    nat, holes = FakeNat(), FakePinholes()
    alg = Alg(nat, holes)
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


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")
def test_status_socket_turns_other_users_away():
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
    reg.register(metrics.AlgCollector(lambda: (alg, latency, {"accepted": 7, "rewritten": 1})))
    text = generate_latest(reg).decode()
    for line in ('ftpalg_rewrites_total{form="PORT"} 1.0', "ftpalg_pinholes_open 1.0",
                 'ftpalg_packets_total{verdict="rewritten"} 1.0', 'ftpalg_packet_seconds_bucket{le="1e-05"} 1.0',
                 'ftpalg_packet_seconds_bucket{le="5e-05"} 2.0', 'ftpalg_packet_seconds_bucket{le="+Inf"} 3.0',
                 'ftpalg_refusals_total{reason="refused"} 0.0', "ftpalg_control_connections 1.0"):
        assert line in text, line
    assert metrics.parse_listen("[::1]:9121") == ("::1", 9121)
    with pytest.raises(ValueError):
        metrics.parse_listen("localhost")
