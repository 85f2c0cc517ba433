"""The control stream under real network faults: loss, duplication and reordering of control
segments on both gateway links (ftpalg.lab.faults in the end hosts), and one long session.
Every transfer is checked by SHA-256."""

from __future__ import annotations

import contextlib
import json
import sys

import pytest

from ftpalg.lab.faults import Faults
from ftpalg.lab.lab import CLIENTS, SERVERS, Lab, sha256

pytestmark = pytest.mark.netns


def sessions(lab: Lab, host: str, n: int, transfers: int, workers: int, mode: str = "PORT") -> dict:
    want = sha256(lab.files / "small.txt")
    res = lab.ns(lab.client, [sys.executable, "-m", "ftpalg.lab.sessions", host, str(n), str(transfers),
                              str(workers), mode, want, CLIENTS[0]], check=False, timeout=600)
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture
def alg(lab):
    before = lab.ruleset()
    p = lab.start_ftpalg()
    yield p
    assert lab.stop_ftpalg(p) == 0
    assert lab.ruleset() == before
    assert "Traceback" not in lab.ftpalg_log()


@pytest.mark.parametrize("server", ["vsftpd", "pyftpdlib"])
def test_sessions_survive_loss_duplication_and_reordering_on_both_links(lab, alg, server):
    injected = []
    with contextlib.ExitStack() as stack:
        q = 3100
        for ns in (lab.client, lab.server):
            for chain in ("OUTPUT", "INPUT"):
                injected.append(stack.enter_context(Faults(ns, drop=0.05, dup=0.05, reorder=0.1, delay_ms=15,
                                                           ports=(21,), chain=chain, queue=q, seed=q)))
                q += 1
        r = sessions(lab, SERVERS[server], 12, 5, 6)
    assert r["sessions_ok"] == 12 and r["transfers_ok"] == 60, (r["failures"], lab.ftpalg_log()[-3000:])
    # the faults really happened to the control connections
    for what in ("dropped", "duplicated", "reordered"):
        assert sum(f.counters.get(what, 0) for f in injected) > 0, (what, [f.counters for f in injected])
    assert lab.ftpalg_log().count("pinhole open") >= 60  # every transfer's PORT was rewritten


@pytest.mark.parametrize("mode", ["PORT", "PASV"])
def test_two_hundred_transfers_in_one_control_session(lab, alg, mode):
    r = sessions(lab, SERVERS["vsftpd"], 1, 200, 1, mode)
    assert r["transfers_ok"] == 200, r


@pytest.mark.parametrize("mode", ["PORT", "PASV"])
def test_uploads_under_faults(lab, alg, mode):
    src = lab.state / f"faulty-up-{mode}"
    src.write_bytes(bytes(range(256)) * 2000)
    with contextlib.ExitStack() as stack:
        q = 3200
        for ns in (lab.client, lab.server):
            for chain in ("OUTPUT", "INPUT"):
                stack.enter_context(Faults(ns, drop=0.05, dup=0.05, reorder=0.1, delay_ms=15, ports=(21,),
                                           chain=chain, queue=q, seed=q))
                q += 1
        for i in range(3):
            name = f"upload/faulty-{mode}-{i}.bin"
            res = lab.ns(lab.client, [sys.executable, "-m", "ftpalg.lab.ftpclient", SERVERS["vsftpd"], "put", str(src),
                                      name, "--mode", mode, "--source", CLIENTS[0]], check=False, timeout=120)
            assert res.returncode == 0, res.stderr[-1500:]
            assert sha256(lab.files / name) == sha256(src)
