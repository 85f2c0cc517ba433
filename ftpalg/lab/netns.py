"""Network namespaces and the processes in them, for every lab of this package: create
namespaces joined by veths (each end inside its namespace, nothing in the host's), start
processes in them, wait for their listeners, and remove it all again, every process left in
them included. Commands that fail raise ``LabError``. Not for production paths.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path


class LabError(RuntimeError):
    pass


def run(argv: list[str], check: bool = True, timeout: float = 60,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def run_all(jobs: Iterable[tuple[list[str], str | None]], timeout: float = 60) -> None:
    """Run commands (argv, stdin) at the same time; raise if one fails."""
    procs = []
    for argv, stdin in jobs:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        procs.append((argv, p, stdin))
    errors = []
    for argv, p, stdin in procs:
        try:
            out, _ = p.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        if p.returncode != 0:
            errors.append(f"{' '.join(argv)} failed ({p.returncode}): {out.strip()}")
    if errors:
        raise LabError("\n".join(errors))


# ---- namespaces and the processes in them -------------------------------------------------------
def netns_list() -> set[str]:
    """The network namespaces that exist (their names, and the ids ``ip netns list`` shows)."""
    return set(run(["ip", "netns", "list"]).stdout.split())


def add_namespaces(names: Iterable[str], veths: Iterable[tuple[str, str, str, str]] = (),
                   addrs: dict[str, dict[str, list[str]]] | None = None) -> None:
    """Create namespaces and veth pairs (namespace, device, peer's namespace, peer device)
    between them, each end in its namespace: nothing in the host's. ``addrs`` (namespace ->
    device -> addresses): bring lo and those devices up with their addresses (``link_batch``)."""
    run(["ip", "-batch", "-"], input="".join(f"netns add {n}\n" for n in names))
    links = "".join(f"link add {d} netns {a} type veth peer name {pd} netns {b}\n" for a, d, b, pd in veths)
    if links:
        run(["ip", "-batch", "-"], input=links)
    for name, devs in (addrs or {}).items():
        run(["ip", "-n", name, "-batch", "-"], input="".join(f"{line}\n" for line in link_batch(devs)))


def link_batch(addrs: dict[str, list[str]]) -> list[str]:
    """``ip -batch`` lines that bring lo and each device up with its addresses (an address
    may carry options: "fd00::9/64 preferred_lft 0"). IPv6 addresses skip DAD and are added
    in reverse: the one added last, the first listed, is the preferred source."""
    return ["link set lo up",
            *[f"addr add {a} dev {d}" for d, aa in addrs.items() for a in aa if ":" not in a],
            *[f"addr add {a} dev {d} nodad" for d, aa in addrs.items() for a in reversed(aa) if ":" in a],
            *[f"link set {d} up" for d in addrs]]


def popen_in(name: str, argv: list[str], log: Path | None = None,
             stdin_log: bool = False) -> subprocess.Popen[bytes]:
    """Start ``argv`` in namespace ``name`` in a process group of its own, output to ``log``.
    ``stdin_log``: standard input is the log too (vsftpd writes its "500 OOPS" there)."""
    with open(log or os.devnull, "ab") as out:
        return subprocess.Popen(["ip", "netns", "exec", name, *argv], stdout=out, stderr=subprocess.STDOUT,
                                stdin=out if stdin_log else subprocess.DEVNULL, start_new_session=True)


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 5.0) -> None:
    """Stop process groups (as ``popen_in`` starts them): SIGTERM to those still running,
    SIGKILL to any not done ``timeout`` seconds later."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout)


def kill_namespace_processes(names: Iterable[str], term: float = 0.3, timeout: float = 5.0,
                             interval: float = 0.05) -> None:
    """Kill every process in the namespaces (servers started elsewhere, sessions in sessions
    of their own): SIGTERM, then SIGKILL after ``term`` seconds (vsftpd/proftpd sessions stuck
    connecting out through a DROP ignore SIGTERM); give up after ``timeout`` seconds."""
    names = list(names)
    term_rounds = round(term / interval)
    for i in range(round(timeout / interval)):
        pids = [pid for n in names for pid in run(["ip", "netns", "pids", n], check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM if i < term_rounds else signal.SIGKILL)
        time.sleep(interval)


def remove_namespaces(names: Iterable[str]) -> None:
    """Kill whatever runs in those of the namespaces that exist, then delete them."""
    existing = netns_list()
    names = [n for n in names if n in existing]
    if names:
        kill_namespace_processes(names)
        run(["ip", "-force", "-batch", "-"], check=False, input="".join(f"netns del {n}\n" for n in names))


def teardown(procs: list[subprocess.Popen[bytes]], names: Iterable[str], *dirs: Path) -> None:
    """Stop ``procs`` (and empty the list), remove the namespaces ``names`` with everything
    still running in them, then the directories ``dirs``."""
    stop_processes(procs)
    procs.clear()
    remove_namespaces(names)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


WAIT_PORTS = """
import socket, sys, time
todo = {(a, int(p)) for a, p in (x.rsplit(",", 1) for x in sys.argv[2:])}
deadline = time.monotonic() + float(sys.argv[1])
while todo and time.monotonic() < deadline:
    for a, p in list(todo):
        try:
            socket.create_connection((a, p), 0.5).close()
            todo.discard((a, p))
        except OSError:
            pass
    if todo:
        time.sleep(0.05)
print(" ".join(f"{a}:{p}" for a, p in sorted(todo)))
sys.exit(1 if todo else 0)
"""


def wait_ports(want: dict[str, list[tuple[str, int]]], timeout: float = 10.0,
               watch: Iterable[subprocess.Popen[bytes]] = ()) -> None:
    """Wait until something listens on each (address, port) of each namespace, probing
    all namespaces at once (one process each); fail early if a ``watch`` process exits."""
    probes = {ns: subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", WAIT_PORTS, str(timeout),
                                    *[f"{a},{p}" for a, p in addrs]], stdout=subprocess.PIPE, text=True)
              for ns, addrs in want.items()}
    watch = list(watch)
    try:
        while any(p.poll() is None for p in probes.values()):
            dead = [p for p in watch if p.poll() is not None]
            if dead:
                raise LabError(f"exited while starting: {dead[0].args!r}")
            time.sleep(0.02)
        missing = {ns: p.communicate()[0].strip() for ns, p in probes.items() if p.returncode != 0}
        if missing:
            raise LabError("nothing listens on " + "; ".join(f"{v} in {ns}" for ns, v in missing.items()))
    finally:
        for p in probes.values():
            if p.poll() is None:
                p.kill()
            p.communicate()

