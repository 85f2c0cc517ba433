"""Several workers (``ftpalg run --workers 2``) in both gateways of the lab: both directions of
every control connection reach the same worker, though NAT gives them different addresses
(a 227 from a server behind DNAT is rewritten, a PORT from a client behind MASQUERADE too);
connections are dealt out to both workers; a worker that dies is replaced; the ruleset is as
found after the run; under load with passive ports reused, a worker's late delete of its used
pinhole never removes the other worker's pinhole of the same tuple."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
from test_netns_nat import fetch

from ftpalg.lab.lab import CLIENTS, OUTSIDE_CLIENTS, PUBLIC_OF, ftpalg_argv, sha256
from netns_checks import no_pinholes_soon

pytestmark = pytest.mark.netns

MODES = ("PASV", "EPSV", "PORT", "EPRT")
# passive sessions in test_workers_lose_no_session_to_reused_passive_ports: 3, 6 and 7 of 4,000
# failed before pinholes were deleted by their kernel id (and 2-3 of 2,000)
SESSIONS = 4000


@pytest.fixture(scope="module")
def workers(lab):
    before = {gw: lab.ruleset(gw) for gw in lab.gateways}
    procs = {gw: lab.start_ftpalg("--workers", "2", gw=gw) for gw in lab.gateways}
    yield procs
    for gw, p in procs.items():
        assert lab.stop_ftpalg(p) == 0
        assert lab.ruleset(gw) == before[gw]  # labels' rules, the dispatch chain: all gone
        log = lab.ftpalg_log_path(gw).read_text()
        assert "Traceback" not in log
        assert "rules removed" in log


def status(lab, gw):
    return json.loads(lab.ns(gw, [*ftpalg_argv(), "status", "--json"]).stdout)


def test_both_directions_reach_one_worker_through_double_nat(lab, workers):
    """Client behind gw (MASQUERADE), server behind gw2 (DNAT tcp/21 only): passive needs
    gw2 to rewrite the server's 227/229 (the reply direction), active needs gw to rewrite
    PORT/EPRT and gw2 to let the server's connection out. Each session is a new control
    connection from the next source port: both workers get some of them."""
    want = sha256(lab.files / "small.txt")
    for i in range(12):
        mode = MODES[i % len(MODES)]
        res = fetch(lab, lab.client, PUBLIC_OF["vsftpd"], mode, CLIENTS[0])
        assert res.returncode == 0 and res.stdout == want, (mode, res.stderr[-1500:])
    for gw in lab.gateways:
        st = status(lab, gw)
        assert [w["answered"] for w in st["workers"]] == [True, True]
        flows = [w["flows"] for w in st["workers"]]
        assert sum(flows) >= 12 and min(flows) >= 2, flows  # dealt out to both
        assert st["counters"].get("faults", 0) == 0
    # 227 rewritten, a pinhole for every data connection (each went through gw2's FORWARD
    # DROP: the downloads above). Not pinholes_used: a pinhole's use is counted when its
    # worker reads the kernel's removal event, which may come after the control
    # connection's FIN closed it as finished.
    c = status(lab, lab.gw2)["counters"]
    assert c.get("rewritten_PASV", 0) >= 3 and c.get("pinholes_opened", 0) >= 12, c
    assert status(lab, lab.gw)["counters"].get("rewritten_PORT", 0) >= 3
    assert no_pinholes_soon(lab, lab.gw) and no_pinholes_soon(lab, lab.gw2)


def test_status_and_metrics_sum_the_workers(lab, workers):
    st = status(lab, lab.gw)
    assert st["counters"]["packets"] == sum(w["packets"] for w in st["workers"]) > 0
    text = lab.ns(lab.gw, [*ftpalg_argv(), "status"]).stdout
    assert "worker 0 (pid" in text and "worker 1 (pid" in text
    scrape = lab.ns(lab.gw, ["python3", "-c", "import urllib.request; print(urllib.request.urlopen("
                             "'http://127.0.0.1:9121/metrics', timeout=5).read().decode())"]).stdout
    # sampled after the status call: at least as many packets as it counted
    count = next(float(line.split()[-1]) for line in scrape.splitlines()
                 if line.startswith("ftpalg_packet_seconds_count "))
    assert count >= st["counters"]["packets"]


def test_a_worker_that_dies_is_replaced(lab, workers):
    """SIGKILL one worker of gw2: its queue passes packets unchanged (bypass) until the
    parent has started another on it; sessions then work again in every mode."""
    st = status(lab, lab.gw2)
    victim = st["workers"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        log = lab.ftpalg_log(lab.gw2)
        if "worker 1 (pid" in log and "restarting it" in log and "worker 1 bound to queue" in log.split(
                "restarting it")[-1]:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"worker not restarted:\n{lab.ftpalg_log(lab.gw2)[-2000:]}")
    st = status(lab, lab.gw2)
    assert victim not in [w["pid"] for w in st["workers"]] and all(w["answered"] for w in st["workers"])
    want = sha256(lab.files / "small.txt")
    for i in range(8):
        mode = MODES[i % len(MODES)]
        res = fetch(lab, lab.server, PUBLIC_OF["vsftpd"], mode, OUTSIDE_CLIENTS[0])
        assert res.returncode == 0 and res.stdout == want, (mode, res.stderr[-1500:])


def test_rules_loaded_for_one_worker_are_refused_for_two(lab):
    """--no-rules with --workers 2 on rules written for one worker: exit 1, saying how to
    print the right ones (else every connection would go to worker 0's queue... and worker 1
    would wait for nothing while the caps assume two). In the lab's client namespace, where
    no ftpalg runs."""
    ns = lab.client
    before = lab.ruleset(ns)
    for part in ("nft", "queue-iptables", "queue-ip6tables"):
        text = lab.ns(ns, [*ftpalg_argv(), "rules", part, "--config", "/dev/null"]).stdout
        (lab.state / f"one-worker.{part}").write_text(text)
    lab.ns(ns, ["nft", "-f", str(lab.state / "one-worker.nft")])
    lab.ns(ns, ["iptables-restore", "--noflush", str(lab.state / "one-worker.queue-iptables")])
    lab.ns(ns, ["ip6tables-restore", "--noflush", str(lab.state / "one-worker.queue-ip6tables")])
    try:
        res = lab.ns(ns, [*ftpalg_argv(), "run", "--config", "/dev/null", "--no-rules", "--workers", "2",
                          "--status-socket", "", "--metrics-listen", ""], check=False, timeout=30)
        assert res.returncode == 1, res.stderr
        assert "ftpalg rules PART --workers 2" in res.stderr
    finally:
        lab.ns(ns, ["nft", "delete", "table", "inet", "ftpalg"], check=False)
        for ipt, family in (("iptables", "ip"), ("ip6tables", "ip6")):
            lab.ns(ns, [ipt, "-t", "mangle", "-D", "PREROUTING", "-j", "FTPALG-QUEUE"], check=False)
            for chain in ("FTPALG-QUEUE", "FTPALG-CONTROL"):
                lab.ns(ns, [ipt, "-t", "mangle", "-F", chain], check=False)
                lab.ns(ns, [ipt, "-t", "mangle", "-X", chain], check=False)
            if f"table {family} mangle" not in before:  # created on demand by iptables-nft
                lab.ns(ns, ["nft", "delete", "table", family, "mangle"], check=False)
    assert lab.ruleset(ns) == before


def test_a_worker_that_cannot_bind_its_queue_stops_the_run_cleanly(lab):
    """Queue 2122 already bound by another process: worker 1 says why and exits, the run
    exits 1 after removing what it installed (worker 0 stopped, rules gone). In the lab's
    client namespace, where no ftpalg runs."""
    import subprocess
    import sys

    ns = lab.client
    before = lab.ruleset(ns)
    holder = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                               "from netfilterqueue import NetfilterQueue as Q; q = Q(); "
                               "q.bind(2122, lambda p: p.accept()); print('bound', flush=True); input()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "bound"
        res = lab.ns(ns, [*ftpalg_argv(), "run", "--config", "/dev/null", "--workers", "2",
                          "--status-socket", "", "--metrics-listen", ""], check=False, timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 1, res.stderr
    assert "worker 1 (queue 2122)" in res.stderr and "worker 1 exited while starting" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "rules removed" in res.stderr
    assert lab.ruleset(ns) == before


def test_workers_lose_no_session_to_reused_passive_ports(lab, workers):
    """Issue 15: passive sessions through gw2's DNAT from one client address, 8 at a time,
    vsftpd handing out 12 passive ports: both workers hold pinholes of identical tuples one
    after the other (each worker's book only knows its own), and a used pinhole is deleted
    some time after its data connection consumed it. That delete must remove only its own
    expectation, never the other worker's fresh one of the same tuple (the session would
    fail: connection refused)."""
    want = sha256(lab.files / "small.txt")
    before = status(lab, lab.gw2)["counters"]
    with lab.vsftpd_passive_ports(40300, 40311):
        res = lab.ns(lab.server, [sys.executable, "-m", "ftpalg.lab.sessions", PUBLIC_OF["vsftpd"], str(SESSIONS),
                                  "1", "8", "PASV", want, OUTSIDE_CLIENTS[0]], check=False, timeout=600)
    out = json.loads(res.stdout)
    after = status(lab, lab.gw2)["counters"]
    log = lab.ftpalg_log_path(lab.gw2).read_text()
    # What ftpalg lost showed as "Connection refused" on the data connection (3-7 of 4,000
    # before the removals were matched by kernel id and a held port was asked of the kernel).
    # vsftpd on 12 ports under this load sometimes fails to bind one itself ("500 OOPS:
    # vsf_sysutil_bind", about 1 in 8,000): its own refusal, not ftpalg's.
    lost = SESSIONS - out["sessions_ok"]
    theirs = [f for f in out["failures"] if "500 OOPS: vsf_sysutil_bind" in f]
    assert lost <= 10 and len(theirs) == lost <= 1, (out["failures"],
                                                     [ln for ln in log.splitlines() if "WARNING" in ln][-20:])
    assert after.get("rewritten_PASV", 0) - before.get("rewritten_PASV", 0) >= SESSIONS - lost
    assert no_pinholes_soon(lab, lab.gw2)
