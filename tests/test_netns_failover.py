"""Gateway failover with state kept in the kernel: two gateways share the virtual addresses,
conntrackd (FTFW) replicates conntrack between them, ftpalg runs on both. An FTP control
connection whose PORT was rewritten by the active gateway keeps working, with further
rewrites, after that gateway goes down between two transfers (ftpalg.lab.failover), and so
does one with no rewrite before the failover, and so does a fail-back to the first gateway,
whose ftpalg still remembers the connection from its first visit; and sessions looping
under load lose nothing when the active gateway fails in the middle of them."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from ftpalg.lab.failover import CLIENT, GATEWAYS, INSIDE_VIP, PUBLIC_VIP, SERVERS, FailoverLab, remove_stale
from ftpalg.lab.lab import sha256

pytestmark = pytest.mark.netns

FILE = "big.bin"
PINHOLE = re.compile(r"pinhole open id=\d+ from=\S+ to=([\d.]+):(\d+) .*?flow=(\S+)")
REWRITE = re.compile(r"pinhole open .* flow=(\S+) b'(PORT [^']*)' -> b'(PORT [^']*)'")


@pytest.fixture(scope="module")
def fo():
    remove_stale()
    lab = FailoverLab(f"fo{os.getpid()}")
    lab.up()
    yield lab
    lab.down()
    assert not lab.leftovers()
    assert not lab.state.exists()


def wait_for(what: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(0.05)
    return what()


def rewrites(log: str, flow: str) -> list[int]:
    """Length change of each PORT line ftpalg rewrote for the control connection ``flow``."""
    return [len(new) - len(old) for f, old, new in REWRITE.findall(log) if f == flow]


def synced(fo: FailoverLab, flow: str) -> bool:
    """Whether the standby's conntrackd holds the control connection ``flow`` and the data
    connection of its last pinhole (whose events come after those of the control
    connection's sequence-adjustment update: so that update is there too)."""
    holes = [(a, p) for a, p, f in PINHOLE.findall(fo.ftpalg_log(fo.active)) if f == flow]
    if not holes:
        return False
    addr, port = holes[-1]
    src, dst = flow.split(">")
    lines = fo.external_cache(fo.standby)
    control = any(f"src={src.split(':')[0]} dst={dst.split(':')[0]} sport={src.split(':')[1]} dport=21 " in x
                  for x in lines)
    return control and any(f"dst={addr} " in x and f"dport={port} " in x for x in lines)


def transfer(s: Any, mode: str, want: str) -> dict[str, Any]:
    res: dict[str, Any] = s.step(f"get {mode} {FILE}")
    assert res["ok"], (mode, res)
    assert res["sha256"] == want, mode
    return res


def test_two_gateways_one_active(fo):
    assert fo.active == "gwa"
    for gw in GATEWAYS:
        assert b"bound to NFQUEUE" in fo.ftpalg_log_path(gw).read_bytes()
        assert fo.conntrackd(gw, "-s").returncode == 0  # the daemon answers on its own socket
        sysctl = fo.ns(gw, ["sysctl", "-n", "net.netfilter.nf_conntrack_tcp_loose",
                            "net.netfilter.nf_conntrack_tcp_be_liberal"]).stdout.split()
        assert sysctl == ["1", "0"]  # kernel defaults: loose pick-up, strict windows
        addrs = fo.ns(gw, ["ip", "-4", "-o", "addr", "show"]).stdout
        assert (f" {INSIDE_VIP}/" in addrs and f" {PUBLIC_VIP}/" in addrs) == (gw == fo.active)


def test_rewritten_session_survives_failover(fo, record_property):
    """PORT through gwa (rewritten: seq adjustment in conntrack), gwa fails, conntrackd's
    external cache is committed on gwb, then PORT and PASV on the same control connection
    through gwb, whose ftpalg picks the connection up mid-stream."""
    server = "vsftpd"
    old, new = fo.active, fo.standby
    want = sha256(fo.files / FILE)
    s = fo.session(server)
    try:
        assert s.hello["ok"], s.hello
        addr, port = s.local
        assert addr == CLIENT
        key = (CLIENT, port, SERVERS[server], 21)
        flow = f"{CLIENT}:{port}>{SERVERS[server]}:21"

        transfer(s, "PORT", want)
        (d1,) = rewrites(fo.ftpalg_log(old), flow)
        assert d1 > 0  # 10,0,0,2 -> 203,0,113,1
        lines = [x for x in fo.conntrack(old, "-p", "tcp", "--dport", "21") if f"sport={port} " in x]
        assert len(lines) == 1 and "helper=sane" in lines[0], lines
        entry = fo.ct_entry(old, *key)
        assert entry is not None
        assert entry["helper"] == "sane"
        assert entry["reply"] == [SERVERS[server], 21, PUBLIC_VIP, port]  # SNAT to the shared address
        assert entry["seqadj"] is not None and entry["seqadj"][0][1:] == [0, d1]
        assert wait_for(lambda: synced(fo, flow)), fo.external_cache(new)

        timings = fo.failover()
        record_property("failover", timings)
        assert fo.active == new
        # what conntrackd carried: NAT (reply tuple), helper, sequence adjustment
        assert fo.ct_entry(new, *key) == entry
        assert fo.expectations(new) == []  # none outstanding between transfers

        t0 = time.monotonic()
        transfer(s, "PORT", want)
        record_property("first_transfer_after_failover", time.monotonic() - t0)
        transfer(s, "PASV", want)
        (d2,) = rewrites(fo.ftpalg_log(new), flow)  # gwb rewrote the second PORT
        assert d2 > 0
        assert rewrites(fo.ftpalg_log(old), flow) == [d1]  # gwa saw nothing more
        after = fo.ct_entry(new, *key)
        assert after is not None and after["seqadj"] is not None
        assert after["seqadj"][0][1:] == [d1, d1 + d2]  # gwb added to the synced correction
        assert after["seqadj"][1] == entry["seqadj"][1]
        assert "227 " in fo.ftpalg_log(new)  # the PASV pinhole (no rewrite: server's own address)
        assert fo.neighbour_mac("c", INSIDE_VIP) == fo.mac(new, "gi")  # the client's traffic went to gwb

        bye = s.step("quit")
        assert bye["ok"] and bye["reply"].startswith("221"), bye
    finally:
        fo.close_session(s)
    for gw in GATEWAYS:
        assert "WARNING" not in fo.ftpalg_log(gw) and "ERROR" not in fo.ftpalg_log(gw), fo.ftpalg_log(gw)


def test_session_without_rewrite_survives_failback(fo, record_property):
    """Baseline: a session with no rewrite before the failover (PASV: the 227 names the server's
    own address) moves back to the other gateway; its synced entry has no sequence adjustment
    yet, and the first rewrite after the failover creates one on the committed entry."""
    server = "pyftpdlib"
    old, new = fo.active, fo.standby
    want = sha256(fo.files / FILE)
    s = fo.session(server)
    try:
        assert s.hello["ok"], s.hello
        _, port = s.local
        key = (CLIENT, port, SERVERS[server], 21)
        flow = f"{CLIENT}:{port}>{SERVERS[server]}:21"

        transfer(s, "PASV", want)
        entry = fo.ct_entry(old, *key)
        assert entry is not None and entry["helper"] == "sane" and entry["seqadj"] is None
        assert wait_for(lambda: synced(fo, flow)), fo.external_cache(new)

        record_property("failover", fo.failover())
        assert fo.ct_entry(new, *key) == entry

        transfer(s, "PORT", want)
        transfer(s, "PASV", want)
        (d,) = rewrites(fo.ftpalg_log(new), flow)
        after = fo.ct_entry(new, *key)
        assert after is not None and after["seqadj"] is not None
        assert after["seqadj"][0][1:] == [0, d]
        assert fo.neighbour_mac("c", INSIDE_VIP) == fo.mac(new, "gi")
        bye = s.step("quit")
        assert bye["ok"] and bye["reply"].startswith("221"), bye
    finally:
        fo.close_session(s)


def test_rewritten_session_survives_failback(fo):
    """A -> B -> A with a rewrite on every visit: after the failback, A's kernel entry is the one
    conntrackd committed (B's corrections included), and A's ftpalg, which still had the flow
    from the first visit, sees the gap in the stream, drops that history and picks the session
    up again."""
    server = "vsftpd"
    first, second = fo.active, fo.standby
    want = sha256(fo.files / FILE)
    s = fo.session(server)
    try:
        assert s.hello["ok"], s.hello
        _, port = s.local
        key = (CLIENT, port, SERVERS[server], 21)
        flow = f"{CLIENT}:{port}>{SERVERS[server]}:21"
        deltas = []
        for gw in (first, second):
            transfer(s, "PORT", want)
            deltas += rewrites(fo.ftpalg_log(gw), flow)
            assert len(deltas) == (1 if gw == first else 2)
            assert wait_for(lambda: synced(fo, flow)), fo.external_cache(fo.standby)
            fo.failover()
        assert fo.active == first
        entry = fo.ct_entry(first, *key)
        assert entry is not None and entry["seqadj"] is not None
        assert entry["seqadj"][0][1:] == [deltas[0], deltas[0] + deltas[1]]  # committed over the stale entry

        res = s.step(f"get PORT {FILE}")
        assert res["ok"] and res["sha256"] == want, res
        # A noticed that the connection's bytes went by elsewhere and dropped its old history
        assert "resync flow=" + flow in fo.ftpalg_log(first), fo.ftpalg_log(first)[-3000:]
        transfer(s, "PASV", want)
        bye = s.step("quit")
        assert bye["ok"] and bye["reply"].startswith("221"), bye
    finally:
        fo.close_session(s)


def test_sessions_under_load_survive_failovers(fo, record_property):
    """Clients looping whole sessions (login, RETR small.txt checked by SHA-256, QUIT) through
    the pair, PORT (rewritten) and PASV, the active gateway failed twice under that load (and
    back). A PORT line rewritten by the failing gateway whose segment died with it comes
    again from the client to the new gateway: its ftpalg finds that line's correction in the
    synced kernel entry and does not add it again (``seqadj_already_corrected``), or the
    server's ack would map back short of the line and the session hang. No session is lost;
    a transfer announced through the failing gateway and started through the new one fails
    with 425 (its pinhole stayed behind) and is tried again on the same session."""
    start = {gw: fo.ftpalg_counters(gw).get("seqadj_already_corrected", 0) for gw in GATEWAYS}
    load = fo.load("vsftpd", seconds=12, modes="PORT*8,PASV*2", timeout=5)
    t0, timings = time.monotonic(), []
    try:
        for at in (2, 7):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            timings.append(fo.failover())
        out, _ = load.communicate(timeout=40)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    res = json.loads(out)
    corrected = {gw: fo.ftpalg_counters(gw).get("seqadj_already_corrected", 0) - start[gw] for gw in GATEWAYS}
    record_property("load", res)
    record_property("failovers", [round(t["total"], 2) for t in timings])
    record_property("seqadj_already_corrected", corrected)
    assert res["PORT"]["sessions"] > 200 and res["PASV"]["sessions"] > 50, res
    assert res["PORT"]["lost"] == 0 and res["PASV"]["lost"] == 0, res
    for gw in GATEWAYS:
        assert "unreplayable" not in fo.ftpalg_log(gw), gw
