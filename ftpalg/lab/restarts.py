"""ftpalg stopped and started again while sessions that each need it run (issue 15): the load
(``ftpalg.lab.sessions``: 8 clients looping login + one transfer + QUIT, each transfer needing
a rewrite) and the restarts during it. Used by tests/test_netns_restart.py, which asserts on
the outcome, and by bench/suite.py (section ``restarts``), which reports it.

How ftpalg is stopped (``HOWS``):

- ``restart``: SIGUSR1, what ``systemctl restart`` sends (deploy/ftpalg.service:
  RestartKillSignal=SIGUSR1): rules and pinholes stay, segments wait for the next ftpalg;
- ``kill``: SIGKILL, a crash: nothing is taken down;
- ``stop``: SIGTERM, what ``systemctl stop`` sends: everything taken down, as found (a stop,
  then a start: not a restart).

Each is followed at once by a new ``ftpalg run`` (``Lab.start_ftpalg``, which returns once it
is bound to its queue)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .lab import OUTSIDE_CLIENTS, PUBLIC_OF, SERVERS, Lab, LabError, sha256

LOAD_SESSIONS = 3000  # about 10 s of sessions, 8 at a time (the load)
CLIENTS = 8
HOWS = {"restart": signal.SIGUSR1, "kill": signal.SIGKILL, "stop": signal.SIGTERM}
RESTART_LOG = "stopping for a restart (SIGUSR1): rules and pinholes kept"


def gateway(lab: Lab, mode: str) -> str:
    """Where ftpalg must rewrite for ``mode``: gw (PORT from behind its MASQUERADE) or gw2
    (PASV to the vsftpd behind its DNAT)."""
    return lab.gw if mode == "PORT" else lab.gw2


def load(lab: Lab, mode: str, sessions: int = LOAD_SESSIONS, clients: int = CLIENTS,
         prefix: Sequence[str] = ()) -> subprocess.Popen[str]:
    """Sessions in a loop that need ftpalg for each transfer: PORT from the client behind gw's
    MASQUERADE (the PORT must be rewritten), or PASV with the 227 address trusted from an
    outside client to the inside vsftpd behind gw2's DNAT (the 227 must be rewritten).
    ``prefix``: put before ``ip netns exec`` (e.g. taskset). ``sessions`` 0: until its
    standard input is closed. Prints ``ftpalg.lab.sessions``'s JSON line when done."""
    want = sha256(lab.files / "small.txt")
    if mode == "PORT":
        ns, args = lab.client, [SERVERS["vsftpd"], str(sessions), "1", str(clients), "PORT", want]
    else:
        ns, args = lab.server, [PUBLIC_OF["vsftpd"], str(sessions), "1", str(clients), "PASV", want,
                                OUTSIDE_CLIENTS[0]]
    return subprocess.Popen([*prefix, "ip", "netns", "exec", ns, sys.executable, "-m", "ftpalg.lab.sessions", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@dataclass
class Stopped:
    """One stop of ftpalg during the load."""

    how: str  # a key of HOWS
    rc: int | None  # its exit status (None: it did not exit within 15 s, then killed)
    log: str  # the stopped ftpalg's log
    rules_kept: bool  # the queue rules still in the gateway's ruleset after it exited
    seconds: float  # from the signal to the next ftpalg bound to its queue


@dataclass
class Outcome:
    load: dict[str, Any]  # ftpalg.lab.sessions' JSON (sessions, sessions_ok, failures, ...)
    stops: list[Stopped] = field(default_factory=list)
    final_rc: int | None = None  # the last ftpalg's exit status after its clean stop (SIGTERM)
    final_log: str = ""
    stderr: str = ""  # the load's

    @property
    def lost(self) -> int:
        return int(self.load["sessions"]) - int(self.load["sessions_ok"])


def under_load(lab: Lab, mode: str, hows: Iterable[str], sessions: int = LOAD_SESSIONS, clients: int = CLIENTS,
               args: Sequence[str] = (), interval: float = 1.0) -> Outcome:
    """ftpalg (``args`` for ``ftpalg run``) in the gateway of ``mode``, the load started, and
    after ``interval`` seconds each of ``hows`` in turn: the stop, at once a new ftpalg, then
    ``interval`` seconds of load again; stops the load has outlasted are not made. Then the
    load's end is awaited and the last ftpalg stopped cleanly (SIGTERM)."""
    gw = gateway(lab, mode)
    p = lab.start_ftpalg(*args, gw=gw)
    stops: list[Stopped] = []
    ld: subprocess.Popen[str] | None = None
    try:
        ld = load(lab, mode, sessions, clients)
        time.sleep(interval)
        for how in hows:
            if ld.poll() is not None:
                break
            t0 = time.monotonic()
            p.send_signal(HOWS[how])
            try:
                rc: int | None = p.wait(15)
            except subprocess.TimeoutExpired:
                rc = None
                p.kill()
                p.wait(5)
            if p in lab.procs:
                lab.procs.remove(p)
            log, kept = lab.ftpalg_log(gw), "FTPALG-QUEUE" in lab.ruleset(gw)
            p = lab.start_ftpalg(*args, gw=gw)
            stops.append(Stopped(how, rc, log, kept, time.monotonic() - t0))
            time.sleep(interval)
        out, err = ld.communicate(timeout=max(300, sessions / 10))
    finally:
        if ld is not None and ld.poll() is None:
            ld.kill()
            ld.wait()
        final_rc = lab.stop_ftpalg(p)
    try:
        res: dict[str, Any] = json.loads(out)
    except ValueError:
        raise LabError(f"the load printed no result ({ld.returncode}): {err[-1500:]}") from None
    return Outcome(res, stops, final_rc, lab.ftpalg_log(gw), err)
