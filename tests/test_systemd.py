"""ftpalg under a real systemd, installed and driven as an admin does (issue 15).

Each lab gateway (gw1: MASQUERADE of the inside clients, gw2: DNAT of the inside servers)
gets a container with systemd as PID 1 (``ftpalg/lab/systemd.py``: the host's ``/usr``, the
gateway's network namespace, booted in about a second). ftpalg is installed the README's way
into ``/opt/ftpalg``, shared by both: a venv from the system python, ``pip install`` of this
checkout's wheel and its dependencies (from a wheelhouse in ``/opt/wheels``: the containers
have no internet),
``ftpalg install``, ``systemctl daemon-reload && systemctl enable --now ftpalg``. Then an
upgrade of the installed package is installed while the old version serves (a wheel of a
higher version, ``pip install``, ``ftpalg install --force``, ``systemctl daemon-reload``), and
with 4 clients looping PORT sessions through gw1 and 4 looping PASV sessions (the 227 address
trusted) through gw2, each download checked by SHA-256: the ``systemctl restart`` that
completes the upgrade, two more, and a crash (``kill -9`` of the main process, restarted by
the unit's ``Restart=on-failure``). A ``systemctl stop`` leaves the
ruleset exactly as found, and so does a stop or a restart that arrives at any moment of
start-up, with systemd recording no failure.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from needs import need
from test_netns_restart import rules_of
from wheels import OFFLINE, as_version

import ftpalg
from ftpalg.lab import restarts
from ftpalg.lab.lab import Lab
from ftpalg.lab.netns import LabError
from ftpalg.lab.systemd import SYSTEMD, Systemd

pytestmark = pytest.mark.netns

UPGRADE = f"{ftpalg.__version__}+upgrade"  # the version the upgrade installs
FTPALG = "/opt/ftpalg/bin/ftpalg"
BOUND = "bound to NFQUEUE"


@dataclass
class Gateway:
    lab: Lab
    ns: str  # the lab namespace: the container's network namespace
    box: Systemd
    before: tuple[str, str, str]  # its rules before ftpalg was installed

    def rules(self) -> tuple[str, str, str]:
        return rules_of(self.lab, self.ns)

    def cursor(self) -> str:
        """Where ftpalg's journal ends now (for ``messages`` and ``wait_bound``)."""
        out = self.box.run(["journalctl", "--no-pager", "-u", "ftpalg", "-n", "1", "-o", "cat", "--show-cursor"]).stdout
        return out.rpartition("-- cursor: ")[2].strip()

    def messages(self, after: str = "") -> str:
        """What ftpalg's unit logged (messages only, systemd's and ftpalg's), after a cursor."""
        return self.box.journal("ftpalg", "-o", "cat", *([f"--after-cursor={after}"] if after else []))

    def wait_bound(self, after: str, timeout: float = 20.0) -> None:
        """Until an ftpalg run has bound the queue since ``after``."""
        deadline = time.monotonic() + timeout
        while BOUND not in self.messages(after):
            if time.monotonic() > deadline:
                raise LabError(f"{self.ns}: no run bound:\n{self.box.journal('ftpalg')[-3000:]}")
            time.sleep(0.1)

    def is_failed(self) -> str:
        """``systemctl is-failed ftpalg``: its state word (``failed`` only if it failed)."""
        return self.box.systemctl("is-failed", "ftpalg", check=False).strip()


def diff(before: tuple[str, ...], after: tuple[str, ...]) -> str:
    return "\n".join(difflib.unified_diff("".join(before).splitlines(), "".join(after).splitlines(), lineterm=""))


@pytest.fixture(scope="module")
def wheels(lab, wheel, tmp_path_factory) -> tuple[Path, Path]:
    """``/opt`` of the gateways, holding ``wheels/``: this checkout's wheel and its
    dependencies' wheels (pip, from PyPI or its cache, on the host); and the upgrade's wheel
    (the same code as version UPGRADE), not yet there."""
    opt = lab.state / "opt"
    (opt / "wheels").mkdir(parents=True)
    opt.chmod(0o755)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w",
                          str(opt / "wheels"), str(wheel)], capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and OFFLINE.search(res.stderr):
        need(False, f"PyPI for the wheel's dependencies (pip could not reach it):\n{res.stderr[-2000:]}")
    assert res.returncode == 0, res.stdout + res.stderr
    return opt, as_version(wheel, UPGRADE, tmp_path_factory.mktemp("upgrade"))


@pytest.fixture(scope="module")
def gateways(lab, wheels) -> Iterator[dict[str, Gateway]]:
    """Both gateways' containers booted, ftpalg installed and enabled as the README says."""
    need(SYSTEMD.exists(), "systemd (Debian package systemd)")
    need(shutil.which("nsenter") and shutil.which("unshare"), "nsenter and unshare (util-linux)")
    opt, _ = wheels
    boxes = {ns: Systemd(ns, ns, lab.state / f"systemd-{ns}", binds=((opt, "/opt", False),))
             for ns in lab.gateways}
    try:
        for box in boxes.values():
            box.start()
        for box in boxes.values():
            box.wait()
        first = next(iter(boxes.values()))
        first.run(["/usr/bin/python3", "-m", "venv", "/opt/ftpalg"])
        first.run(["/opt/ftpalg/bin/pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                   "--find-links", "/opt/wheels", "ftpalg"])
        gws = {}
        for ns, box in boxes.items():
            gw = gws[ns] = Gateway(lab, ns, box, rules_of(lab, ns))
            out = box.run([FTPALG, "install"]).stdout
            assert "wrote         /etc/systemd/system/ftpalg.service" in out and "WARNING" not in out, out
            box.run(["sh", "-c", "systemctl daemon-reload && systemctl enable --now ftpalg"])
            assert queue_bound(gw)
        yield gws
    finally:
        for box in boxes.values():
            box.shutdown()


# ---- restarts, a crash and an upgrade under load -------------------------------------------
def queue_bound(gw: Gateway, queue: int = 2121) -> bool:
    """Whether a process has bound NFQUEUE ``queue`` in the gateway's namespace."""
    table = gw.lab.ns(gw.ns, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    return any(line.split()[:1] == [str(queue)] for line in table.splitlines())


def restart(gws: list[Gateway]) -> None:
    """``systemctl restart``: it returns once the new ftpalg has bound the queue (Type=notify)."""
    for gw in gws:
        mark = gw.cursor()
        gw.box.systemctl("restart", "ftpalg")
        assert queue_bound(gw)
        gw.wait_bound(mark)  # and its journal says so


def crash(gws: list[Gateway]) -> None:
    """``kill -9`` of the main process: the unit restarts it (``Restart=on-failure``)."""
    marks = [gw.cursor() for gw in gws]
    for gw in gws:
        gw.box.run(["kill", "-9", gw.box.show("ftpalg", "MainPID")["MainPID"]])
    for gw, mark in zip(gws, marks, strict=True):
        gw.wait_bound(mark)


def install_upgrade(gws: list[Gateway], wheel: Path) -> None:
    """The new wheel installed in place while the old ftpalg serves, and the README's steps up
    to the restart: ``ftpalg install --force``, ``systemctl daemon-reload``."""
    shutil.copy2(wheel, gws[0].box.path("/opt/wheels"))
    gws[0].box.run(["/opt/ftpalg/bin/pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                    "--find-links", "/opt/wheels", f"ftpalg=={UPGRADE}"])
    for gw in gws:
        out = gw.box.run([FTPALG, "install", "--force"]).stdout
        assert f"ftpalg {UPGRADE}: " in out and "replaced      /etc/systemd/system/ftpalg.service" in out, out
        gw.box.systemctl("daemon-reload")


def test_restarts_a_crash_and_an_upgrade_under_load_lose_no_session(lab, gateways, wheels, tmp_path):
    """The upgrade is installed while the old version serves; under load, the restart that
    completes it, two more restarts and a crash."""
    gws = list(gateways.values())
    marks = {gw.ns: gw.cursor() for gw in gws}
    install_upgrade(gws, wheels[1])
    loads = {mode: restarts.load(lab, mode, 0, clients=4) for mode in ("PORT", "PASV")}
    # the crash last: a segment dropped several times waits longer each time (TCP's backoff),
    # and steps closer than that would add up (seen: PORT sessions stalled 13 s by a crash and
    # a restart 2.5 s apart)
    steps = [("systemctl restart (the upgrade)", restart), ("systemctl restart", restart),
             ("systemctl restart", restart), ("kill -9 (a crash)", crash)]
    start = time.monotonic()
    try:
        time.sleep(1.0)  # the old version serves, its files replaced
        for what, step in steps:
            assert all(p.poll() is None for p in loads.values()), f"the load ended before {what}"
            t0 = time.monotonic()
            step(gws)
            print(f"{what} at {t0 - start:.1f} s: {time.monotonic() - t0:.1f} s until both gateways' ftpalg was "
                  f"bound again")
            for gw in gws:
                assert "FTPALG-QUEUE" in lab.ruleset(gw.ns)
            time.sleep(1.0)
    finally:
        results = {}
        for mode, p in loads.items():
            out, err = p.communicate(timeout=120)  # closes its standard input: the loops end
            results[mode] = json.loads(out) if out else {"error": err}
    journals = {gw.ns: gw.box.journal("ftpalg", "-o", "short-precise") for gw in gws}
    for ns, text in journals.items():  # kept by pytest (its last 3 runs' basetemp)
        (tmp_path / f"journal-{ns}.txt").write_text(text)
    for mode, res in results.items():
        print(f"{mode}: {res['sessions_ok']} of {res['sessions']} sessions, {res['seconds']} s, "
              f"failures: {res['failures']}")
    for gw in gws:
        print(f"--- {gw.ns}: systemctl status ftpalg\n{gw.box.systemctl('status', 'ftpalg', '-n0', check=False)}")
    # Every session's download checked out (a PORT or 227 that passed unrewritten would fail).
    # What may be left (tests/test_netns_restart.py): after the crash, a 227 whose PASV the
    # killed run saw reaches the new one, which opens nothing for a reply no PASV of its own
    # asked for (a restart hands such a PASV over in conntrack labels; a kill -9 cannot).
    assert results["PORT"]["sessions"] > 50 and results["PASV"]["sessions"] > 50, results
    assert results["PORT"]["sessions_ok"] == results["PORT"]["sessions"], results["PORT"]
    assert results["PASV"]["sessions"] - results["PASV"]["sessions_ok"] <= 4, results["PASV"]

    for gw in gws:
        log, messages = journals[gw.ns], gw.messages(marks[gw.ns])
        assert gw.is_failed() == "active"
        show = gw.box.show("ftpalg", "Result", "MainPID", "ActiveState")  # (NRestarts: 0 since the restarts)
        assert show["Result"] == "success" and show["ActiveState"] == "active", show
        # the journal says what happened, a readable line each time
        assert messages.count(BOUND) == 4, log
        assert messages.count("stopping for a restart (SIGUSR1): rules and pinholes kept") == 3, log
        assert "ftpalg.service: Main process exited, code=killed, status=9/KILL" in messages, log
        assert "ftpalg.service: Scheduled restart job, restart counter is at 1." in messages, log
        assert messages.count("ftpalg.service: Failed with result") == 1, log  # the crash, nothing else
        assert "Traceback" not in messages and " ERROR " not in messages, log
        # ftpalg's lines without a time of their own (the journal has it): "ftpalg INFO ..."
        ours = [line for line in messages.splitlines() if not line.startswith(("ftpalg.service", "Start", "Stop"))]
        assert ours and all(re.match(r"ftpalg (INFO|WARNING) ", line) for line in ours), ours[:5]
        # the old version served until the restart, the new one since
        assert messages.index("stopping for a restart") < messages.index(f"version {UPGRADE}; configuration: "
                                                                          "/etc/ftpalg/ftpalg.toml"), log
        assert messages.count(f"version {UPGRADE}; configuration: /etc/ftpalg/ftpalg.toml") == 4, log
        assert f"(ftpalg {UPGRADE})" in gw.box.systemctl("cat", "ftpalg")  # the unit: which installation wrote it
        exe = gw.box.run(["cat", f"/proc/{show['MainPID']}/cmdline"]).stdout.split("\0")
        assert exe[:3] == ["/opt/ftpalg/bin/python3", FTPALG, "run"], exe


# ---- stops ---------------------------------------------------------------------------------
def test_systemctl_stop_leaves_the_ruleset_as_found(gateways):
    """``systemctl stop`` not followed by a start (here after the upgrade: the new version
    removes what the old one's runs kept)."""
    for gw in gateways.values():
        if gw.box.show("ftpalg", "ActiveState")["ActiveState"] != "active":
            gw.box.systemctl("start", "ftpalg")
        gw.box.systemctl("stop", "ftpalg")
        assert gw.is_failed() == "inactive"
        assert gw.box.show("ftpalg", "Result")["Result"] == "success"
        assert gw.rules() == gw.before, diff(gw.before, gw.rules())
        assert "rules removed" in gw.messages().rsplit(BOUND, 1)[-1]  # (one look at the whole journal)


STARTUP = re.compile(r"stopped during start-up on (SIG\w+) \(it came while ([^)]*)\)")


def test_a_stop_or_restart_during_start_up_is_clean(gateways):
    """``systemctl start`` and, 0 to 70 % of a start-up's time later, ``systemctl stop``
    (SIGTERM) or ``systemctl restart`` (SIGUSR1): systemd records a clean stop each time
    (Result=success, never ``failed``), a stop leaves the ruleset as found, a restart ends
    with ftpalg serving. Some
    land before Python has run ftpalg's code (the signal's default action: death by it, which
    the unit counts as clean: ``SuccessExitStatus=``), the others in a step of start-up."""
    gw = next(iter(gateways.values()))
    box = gw.box
    box.systemctl("stop", "ftpalg")
    t0 = time.monotonic()
    box.systemctl("start", "ftpalg")  # returns once bound (Type=notify)
    startup = time.monotonic() - t0
    box.systemctl("stop", "ftpalg")
    where: Counter[str] = Counter()
    bad = []
    for how in ("stop", "restart"):
        for delay in (0, 0.15 * startup, 0.4 * startup, 0.7 * startup):
            box.systemctl("reset-failed", "ftpalg")  # systemd's start limit: 5 starts in 10 s
            mark = gw.cursor()
            box.run(["sh", "-c", f"systemctl start --no-block ftpalg; sleep {delay}; systemctl {how} ftpalg"])
            new = gw.messages(mark)
            m = STARTUP.search(new)
            where[f"{how}: {m.group(2) if m else 'serving' if 'stopping on SIG' in new else 'before the handler'}"] \
                += 1
            show = box.show("ftpalg", "Result", "ActiveState")
            want = "active" if how == "restart" else "inactive"
            if show != {"Result": "success", "ActiveState": want} or "Failed with result" in new \
                    or "Traceback" in new:
                bad.append(f"{how} {delay * 1000:.0f} ms later: {show}\n{new}")
            box.systemctl("stop", "ftpalg")
            if gw.rules() != gw.before:
                bad.append(f"{how} {delay * 1000:.0f} ms later, then stop: ruleset changed:\n"
                           f"{diff(gw.before, gw.rules())}")
                break
    print(f"start-up {startup:.2f} s; stops and restarts during it, where they landed: {dict(where)}")
    assert not bad, "\n".join(bad)
