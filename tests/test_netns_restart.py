"""Kernel-held state in practice: a session whose lines were rewritten survives ``kill -9`` of
ftpalg and its restart, and a clean stop; what ftpalg added is gone after a clean exit, also
after a stop at any point of its start-up."""

from __future__ import annotations

import difflib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from ftpalg.lab import restarts
from ftpalg.lab.lab import GW_PUBLIC, SERVERS, Lab, ftpalg_argv, sha256

pytestmark = pytest.mark.netns

SESSION = r"""
import hashlib, sys
sys.path.insert(0, sys.argv[1])
from ftpalg.lab.ftpclient import LabFTP
ftp = LabFTP("PORT", timeout=15)
ftp.connect(sys.argv[2], 21)
ftp.login()
for step in sys.stdin:  # one transfer per line the test sends: PORT, EPRT, PASV or NOOP
    mode = step.strip()
    try:
        if mode == "NOOP":
            print(ftp.voidcmd("NOOP"), flush=True)
            continue
        ftp.mode = mode
        ftp.passiveserver = mode == "PASV"
        h = hashlib.sha256()
        ftp.retrbinary("RETR big.bin", h.update)
        print(h.hexdigest(), flush=True)
    except Exception as e:
        print(f"ERROR {type(e).__name__}: {e}", flush=True)
ftp.quit()
print("BYE", flush=True)
"""


class Session:
    """One control connection kept open across ftpalg's life: the test drives it step by step."""

    def __init__(self, lab: Lab, server: str) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        self.p = subprocess.Popen(["ip", "netns", "exec", lab.client, sys.executable, "-c", SESSION, root, server],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def step(self, what: str) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(what + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def close(self) -> str:
        assert self.p.stdin is not None
        self.p.stdin.close()
        out = self.p.stdout.read() if self.p.stdout else ""
        self.p.wait(15)
        return out.strip()


@pytest.mark.parametrize("server", ["vsftpd", "pyftpdlib"])
def test_rewritten_session_survives_kill_9_and_restart(lab, server):
    want = sha256(lab.files / "big.bin")
    before = lab.ruleset()
    p = lab.start_ftpalg()
    s = Session(lab, SERVERS[server])
    try:
        assert s.step("PORT") == want  # rewritten: the connection now has seq corrections
        assert "pinhole open" in lab.ftpalg_log() and GW_PUBLIC.replace(".", ",") in lab.ftpalg_log()
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        lab.procs.remove(p)
        # nobody serves the queue: packets bypass it, the kernel keeps correcting seq/ack
        assert s.step("NOOP").startswith("200")
        assert s.step("PASV") == want
        p = lab.start_ftpalg()  # picks the session up without a new SYN
        assert s.step("PORT") == want
        assert s.step("EPRT") == want
        assert s.step("PASV") == want
        log = lab.ftpalg_log()
        assert log.count("pinhole open") == 3 and "Traceback" not in log
    finally:
        rc = lab.stop_ftpalg(p)
    try:
        assert rc == 0
        # a clean stop: what ftpalg added is gone (also the tables iptables-nft made for the
        # first, killed instance), and the session still works without it
        assert lab.ruleset() == before
        assert lab.expectations() == []
        assert s.step("NOOP").startswith("200")
        assert s.step("PASV") == want
        assert s.close().endswith("BYE")
    finally:
        s.p.kill()


# ---- a stop during start-up ---------------------------------------------------------------------
def caught(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler of its own for ``sig`` (/proc's SigCgt)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # already gone
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(mask >> (sig - 1) & 1)


def rules_of(lab: Lab, gw: str | None = None) -> tuple[str, str, str]:
    """A gateway's (gw1's by default) nftables ruleset and iptables-save/ip6tables-save
    (without their dated comment lines and the chains' packet counters)."""
    return lab.ruleset(gw), *(re.sub(r"(?m)^#.*\n|\[\d+:\d+\]", "", out)
                              for out in (lab.gw_rules(gw), lab.gw_rules6(gw)))


def left_in(lab: Lab, within: float = 3.0) -> list[str]:
    """Processes still in the gateway's namespace ``within`` seconds after ftpalg exited."""
    deadline = time.monotonic() + within
    while True:
        pids = subprocess.run(["ip", "netns", "pids", lab.gw], capture_output=True, text=True).stdout.split()
        if not pids or time.monotonic() > deadline:
            return [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    for p in pids if Path(f"/proc/{p}").exists()]
        time.sleep(0.05)


STARTUP_PHASE = re.compile(r"stopped during start-up on (SIG\w+) \(it came while ([^)]*)\)")


def stop_once(lab: Lab, workers: int, when: float | str, sig: signal.Signals, group: bool) -> tuple[int, bool, str]:
    """Start ``ftpalg run``, send ``sig`` ``when`` seconds later or as soon as its log has the
    line ``when``, to it or to its whole process group; its exit status, whether it had a
    SIGTERM handler of its own when the signal went, and its log."""
    log_path = lab.ftpalg_log_path()
    log_path.write_bytes(b"")
    p = lab.popen(lab.gw, [*ftpalg_argv(), "run", "--log-level", "info", "--workers", str(workers)], log_path)
    try:
        if isinstance(when, str):
            deadline = time.monotonic() + 20
            while when not in log_path.read_text() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
        else:
            time.sleep(when)
        handled = caught(p.pid, signal.SIGTERM)
        (os.killpg if group else os.kill)(p.pid, sig)
        rc = p.wait(20)
    finally:
        lab.stop_ftpalg(p)
    return rc, handled, log_path.read_text()


@pytest.mark.parametrize("workers,first,step", [(1, 0, 50), (2, 50, 100)])
def test_a_stop_at_any_point_of_start_up_exits_0_and_leaves_the_ruleset_as_found(lab, workers, first, step):
    """A stop after ``first`` ms of start-up, ``step`` ms more, and so on until one lands once
    ftpalg serves (2 workers: a longer start-up, offset to fall between those of 1); then one
    as soon as the log says the metrics endpoint is up (next: the rules), and one once it says
    the rules are installed (next: the queue, or the workers). SIGTERM to ftpalg alone (``kill``), every other time to
    its whole process group (systemd's control-group kill: workers and rule tools too), every
    fourth time SIGINT to the group (Ctrl-C). Once ftpalg has its handler (SigCgt has SIGTERM)
    each must end with exit 0 and a log line naming the step of start-up it came in (or the
    ordinary stop, once serving); every one with the ruleset exactly as found and no process
    left in the namespace. Before the handler (the interpreter starting), the signal's default
    action is all there can be, with nothing touched yet."""
    before = rules_of(lab)
    bad: list[str] = []
    phases: Counter[str] = Counter()
    stops = early = 0

    def check(when: float | str) -> bool:
        """One stop; False if it left something behind (the rest would not be meaningful)."""
        nonlocal stops, early
        sig = signal.SIGINT if stops % 4 == 3 else signal.SIGTERM
        group = stops % 2 == 1
        stops += 1
        rc, handled, log = stop_once(lab, workers, when, sig, group)
        what = f"{f'{when * 1000:.0f} ms' if isinstance(when, float) else repr(when)}, " \
               f"{sig.name}{' to the group' if group else ''}"
        m = STARTUP_PHASE.search(log)
        if m:
            phases[m.group(2)] += 1
        elif "bound to NFQUEUE" in log and "stopping on" in log:
            phases["serving"] += 1
        if not handled and not re.search(r" ftpalg [A-Z]+ ", log):
            early += 1  # ftpalg's code had not run yet: no handler, nothing installed, nothing said
        elif rc != 0 or not (m or "stopping on" in log) or "Traceback" in log:
            bad.append(f"{what}: exit {rc}, log:\n{log}")
        if (after := rules_of(lab)) != before:
            diff = difflib.unified_diff("".join(before).splitlines(), "".join(after).splitlines(), lineterm="")
            bad.append(f"{what}: ruleset changed:\n" + "\n".join(diff))
            return False
        if left := left_in(lab):
            bad.append(f"{what}: left behind: {left}")
            return False
        return True

    ms = first
    while "serving" not in phases and ms <= 3000 and check(ms / 1000):
        ms += step
    for line in ("metrics on http", "rules installed"):
        if not bad:
            check(line)
    print(f"workers {workers}: {stops} stops, {early} before ftpalg's handler; by step: {dict(phases)}")
    assert not bad, f"{len(bad)} of {stops} stops went wrong:\n" + "\n".join(bad)
    want = {"installing the rules", "serving"} | ({"starting the workers"} if workers > 1 else set())
    assert want <= set(phases), phases  # the stops met every long step of start-up


# ---- restarts under load (issue 15) ------------------------------------------------------------
@pytest.mark.parametrize("mode,kinds", [("PORT", ("restart", "kill", "restart")),
                                        ("PASV", ("restart", "kill", "restart")),
                                        ("PASV", ("restart", "restart", "restart"))],
                         ids=["PORT", "PASV", "PASV-clean"])
def test_restarts_under_load_lose_no_session(lab, mode, kinds):
    """ftpalg restarted three times while 8 clients loop sessions that each need a rewrite:
    stopped for a restart (SIGUSR1, systemd's RestartKillSignal) and started again, or
    killed (-9) and started again. The rules stay, segments that need ftpalg wait for the
    next one (dropped meanwhile: TCP resends them) instead of passing unrewritten, a PASV
    the old ftpalg saw is handed over to the new one in the kernel's entry, and no session
    fails. Then a clean stop leaves the ruleset as found."""
    gw = restarts.gateway(lab, mode)
    before = lab.ruleset(gw)
    out = restarts.under_load(lab, mode, kinds)
    res = out.load
    for s in out.stops:
        assert s.rules_kept, s.how  # the rules stay for the next one
        if s.how == "restart":
            assert s.rc == 0 and restarts.RESTART_LOG in s.log, s.log
    assert out.final_rc == 0
    assert len(out.stops) == 3, ("the load ended before the restarts", res)
    assert res["sessions"] == restarts.LOAD_SESSIONS
    # Before the rules stayed across restarts about half of such sessions failed (the issue's
    # run: 1,465 and 1,732 of 3,000). What may be left after a kill -9 (nothing is handed
    # over): a 227 whose PASV the killed ftpalg saw reaches the new one, which opens nothing
    # for a passive reply no PASV of its own asked for (the reply gating of the security
    # model); that transfer fails: measured 0-6 of 3,000 PASV sessions per run, 0 of 3,000
    # PORT sessions. Stopped for a restart, the old ftpalg hands such PASVs over: none lost.
    print(f"restarts under load, {mode}: {res['sessions_ok']} of {res['sessions']} sessions, {res['seconds']} s")
    warnings = [ln for log in [*(s.log for s in out.stops), out.final_log] for ln in log.splitlines()
                if "WARNING" in ln]
    assert out.lost <= (0 if "kill" not in kinds else 3 if mode == "PORT" else 12), (res["failures"], warnings)
    assert lab.ruleset(gw) == before


def test_an_ftpalg_that_stays_away_lets_ftp_through_unchanged_after_the_handover_bound(lab):
    """Killed and not started again: for HANDOVER seconds the segments ftpalg must see are
    held back (dropped: a PORT through the MASQUERADE does not pass unrewritten); after it,
    they pass unchanged (fail-open, as before: a passive session works, a PORT is refused by
    the server as a foreign address, not hung). Then a clean run replaces the rules."""
    from ftpalg.linux.rules import HANDOVER

    before = lab.ruleset()
    p = lab.start_ftpalg()
    p.kill()
    p.wait(5)
    t0 = time.monotonic()
    r = lab.ns(lab.client, ["curl", "-sS", "--max-time", "3", "-P", "-", f"ftp://{SERVERS['vsftpd']}/small.txt",
                            "-o", "/dev/null"], check=False, timeout=10)
    assert r.returncode != 0 and time.monotonic() - t0 < HANDOVER  # held back within the bound
    time.sleep(max(0.0, HANDOVER + 0.5 - (time.monotonic() - t0)))
    r = lab.ns(lab.client, ["curl", "-sS", "--max-time", "10", f"ftp://{SERVERS['vsftpd']}/small.txt",
                            "-o", "/dev/null"], check=False, timeout=20)
    assert r.returncode == 0, r.stderr  # EPSV, unchanged: fail-open after the bound
    p = lab.start_ftpalg()
    assert lab.stop_ftpalg(p) == 0
    assert lab.ruleset() == before
