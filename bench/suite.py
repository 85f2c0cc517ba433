"""One benchmark suite: ftpalg against the kernel's FTP helper (and against no ALG, and
against a do-nothing NFQUEUE handler), through real kernel NAT in the namespace lab.

    .venv/bin/python bench/suite.py [--quick] [--out DIR] [--only a,b,...]      (root)

Sections (``--only`` takes their names; default all, ~12 min on a 2-core VM, ``--quick`` ~4 min):

  rtt         NOOP round trip on an established control connection, client -> gw
              (MASQUERADE) -> vsftpd: none | kernel helper | nfq-null (ftpalg's queue rules,
              a handler that accepts every packet: the floor of any user-space ALG) | ftpalg
  sessions    8 client processes looping login + PORT/PASV + RETR small.txt + QUIT for a
              fixed time, sessions/s; client-nat (client -> gw -> vsftpd, ALG in gw) and
              server-nat (outside client -> gw2 DNAT -> inside vsftpd, ALG in gw2); kernel
              helper | nfq-null (no ALG at all: active sessions fail, passive ones show what
              queueing the same selected segments costs) | ftpalg 1 worker | ftpalg 2 workers.
              Per cell also the packets queued per session (the gateway's NFQUEUE id sequence)
              and the handler's CPU time per session (its process tree's utime + stime)
  pinned      the same sessions, PORT through MASQUERADE and PASV through DNAT, with ftpalg
              (1 and 2 workers) pinned to core 1 and clients and servers to core 0: sessions/s,
              each core's load, ftpalg's share of its core, and what that core would carry
  restarts    8 clients x 3,000 sessions (ftpalg.lab.restarts, as tests/test_netns_restart.py)
              per mode (PORT through MASQUERADE, PASV through DNAT): through the kernel helper,
              through ftpalg left running, and with ftpalg restarted 3 times during them by
              SIGUSR1 (systemctl restart), kill -9, and SIGTERM (systemctl stop), each followed
              at once by a new `ftpalg run`: sessions lost; then 2 workers, 8,000 passive
              sessions through DNAT to a vsftpd with 12 passive ports (reused): sessions lost
  throughput  one large PASV download through gw (a sparse file made for the run), MB/s
  core        the pure core in-process (Alg with the test fakes): µs per packet, fast path
              vs a rewritten PORT
  memory      in-process: bytes the core keeps per tracked control connection at 10 000
              (tracemalloc, and RSS delta in a separate process)
  lab-memory  ftpalg's RSS growth in gw with 10 000 real idle control connections through it
              (bench/floods.py's idle flood, to its flood server)
  pinholes    ftpalg's LinuxKernel (expect/withdraw) over CtNetlink in the gw namespace: open and close
              one expectation on each of N idle control connections that carry the `sane`
              helper, µs per call

Variants are measured in the same run and alternated: every section runs rounds, each round
every variant once (the order rotating); the summary takes medians across rounds. Prints a
table (numbers, ratios, and for each target met / not met; nothing is asserted), writes
suite.json (raw numbers and the machine) and suite.png (if matplotlib is importable) to
--out (default bench/out/). One lab for the whole run, always torn down (Ctrl-C too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftpalg.lab import restarts  # noqa: E402
from ftpalg.lab.lab import (  # noqa: E402
    GW_PUBLIC,
    OUTSIDE_CLIENTS,
    PUBLIC_OF,
    SERVERS,
    Lab,
    LabError,
    ftpalg_argv,
    run,
)

PY = sys.executable
CLIENT = str(ROOT / "bench" / "_suite_client.py")
GWTOOL = str(ROOT / "bench" / "_suite_gw.py")
CORE = str(ROOT / "bench" / "_suite_core.py")
HELPER = ["PREROUTING", "-p", "tcp", "--dport", "21", "-j", "CT", "--helper", "ftp"]
SECTIONS = ("rtt", "control", "sessions", "pinned", "restarts", "throughput", "core", "memory", "lab-memory",
            "pinholes")
LAB_SECTIONS = ("rtt", "control", "sessions", "pinned", "restarts", "throughput", "lab-memory", "pinholes")
LABELS = {"none": "none", "kernel": "kernel", "nfq-null": "nfq-null", "ftpalg-w1": "ftpalg w1",
          "ftpalg-w2": "ftpalg w2"}
TOPOS = ("client-nat", "server-nat")
MODES = {"PASV": "passive", "PORT": "active"}
SMALL = ("small.txt", 1000)


@dataclass(frozen=True)
class Plan:
    rtt_rounds: int = 5
    rtt_count: int = 2000  # NOOPs per round and variant
    rtt_warmup: int = 200
    ctl_rounds: int = 3
    ctl_seconds: float = 4.0  # per cell
    ctl_procs: int = 8
    sess_rounds: int = 3
    sess_seconds: float = 4.0  # per cell
    sess_procs: int = 8
    pin_rounds: int = 3
    pin_seconds: float = 4.0  # per cell
    rs_sessions: int = 3000  # per restart run (the load)
    rs_clients: int = 8
    w2_sessions: int = 8000  # 2 workers, reused passive ports (the run)
    tp_rounds: int = 4
    tp_mib: int = 1024  # sparse: costs no disk; big enough that one transfer takes ~1 s
    core_packets: int = 5000
    mem_conns: int = 10000
    ph_conns: int = 200
    ph_rounds: int = 5
    lab_conns: int = 10000  # idle control connections through ftpalg (lab-memory)


QUICK = Plan(rtt_rounds=2, rtt_count=500, rtt_warmup=100, ctl_rounds=1, ctl_seconds=1.5,
             sess_rounds=2, sess_seconds=1.5, pin_rounds=1, pin_seconds=1.5, rs_sessions=1500, w2_sessions=1500,
             tp_rounds=2, tp_mib=256,
             core_packets=1500, mem_conns=3000, ph_conns=50, ph_rounds=2, lab_conns=2000)

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def pct(values: list[float] | list[int], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return float(s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]) if s else math.nan


def med(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


def rotate(items: list[str], r: int) -> list[str]:
    k = r % len(items)
    return items[k:] + items[:k]


# ---- the lab's variants ---------------------------------------------------------------------
@dataclass
class Running:
    variant: str
    gw: str
    proc: subprocess.Popen[bytes] | None = None
    log: str = ""  # ftpalg's / the null handler's log after it stopped


def has_workers() -> bool:
    res = subprocess.run([*ftpalg_argv(), "run", "--help"], capture_output=True, text=True, timeout=30)
    return "--workers" in res.stdout


def wait_log(path: Path, text: str, count: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text(errors="replace").count(text) >= count:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def start(lab: Lab, variant: str, gw: str, workers_opt: bool) -> Running:
    if variant == "none":
        return Running(variant, gw)
    if variant == "kernel":
        lab.ns(gw, ["iptables", "-t", "raw", "-A", *HELPER])
        return Running(variant, gw)
    if variant == "nfq-null":
        log = lab.state / f"nullq-{gw}.log"
        log.write_bytes(b"")
        p = lab.popen(gw, [PY, GWTOOL, "nullq"], log)
        if not wait_log(log, "bound to NFQUEUE", 1, p, 15.0):
            lab.stop_ftpalg(p)
            raise LabError(f"null handler did not start in {gw}:\n{log.read_text(errors='replace')[-2000:]}")
        return Running(variant, gw, p)
    n = int(variant.removeprefix("ftpalg-w"))
    p = lab.start_ftpalg(*(["--workers", str(n)] if workers_opt else []), gw=gw)  # waits for "bound to NFQUEUE"
    bound = lab.ns(gw, ["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False).stdout.count("\n")
    if bound != n:
        say(f"note: {variant} in {gw}: {bound} queues bound, not {n}")
    return Running(variant, gw, p)


def stop(lab: Lab, r: Running) -> None:
    if r.variant == "kernel":
        lab.ns(r.gw, ["iptables", "-t", "raw", "-D", *HELPER], check=False)
    elif r.proc is not None:
        rc = lab.stop_ftpalg(r.proc)
        path = lab.ftpalg_log_path(r.gw) if r.variant.startswith("ftpalg") else lab.state / f"nullq-{r.gw}.log"
        r.log = path.read_text(errors="replace") if path.exists() else ""
        if rc != 0:
            say(f"note: {r.variant} in {r.gw} exited with {rc}: {r.log[-500:]}")


@contextlib.contextmanager
def running(lab: Lab, variant: str, gws: list[str], workers_opt: bool,
            runs: dict[str, Running] | None = None) -> Iterator[dict[str, Running]]:
    """``variant`` in each gateway of ``gws`` (filling ``runs``), stopped on the way out."""
    runs = {} if runs is None else runs
    try:
        for gw in gws:
            runs[gw] = start(lab, variant, gw, workers_opt)
        yield runs
    finally:
        for r in runs.values():
            stop(lab, r)


def flush_conntrack(lab: Lab) -> None:
    for gw in lab.gateways:
        lab.ns(gw, ["conntrack", "-F"], check=False)


def client(lab: Lab, ns: str, args: list[str], timeout: float = 120, cpus: str | None = None) -> dict[str, Any]:
    """``_suite_client.py args`` in ``ns`` (``cpus``: pinned there with taskset); its JSON."""
    res = lab.ns(ns, [*(["taskset", "-c", cpus] if cpus else []), PY, CLIENT, *args], check=False, timeout=timeout)
    if res.returncode != 0 or not res.stdout.strip():
        raise LabError(f"client {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()[-800:]}")
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ---- ftpalg's process: CPU time and packets -------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK")


def retransmissions(lab: Lab, ns: str) -> int:
    """TCP segments retransmitted in namespace ``ns`` so far (/proc/net/snmp, RetransSegs)."""
    text = lab.ns(ns, ["cat", "/proc/net/snmp"], check=False).stdout
    tcp = [line.split() for line in text.splitlines() if line.startswith("Tcp:")]
    return int(dict(zip(tcp[0], tcp[1], strict=False)).get("RetransSegs", 0)) if len(tcp) >= 2 else 0


def tree_cpu(pid: int) -> float:
    """utime + stime (seconds) of ``pid`` and every live descendant (workers)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(d.name)] = int(fields[1])
        cpu[int(d.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p in tree:
            continue
        tree.add(p)
        todo += [c for c, pp in parents.items() if pp == p]
    return sum(cpu.get(p, 0.0) for p in tree)


def queued(lab: Lab, gw: str) -> int:
    """Packets the kernel queued to user space in ``gw`` (id_sequence, summed over queues)."""
    text = lab.ns(gw, ["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False).stdout
    return sum(int(line.split()[7]) for line in text.splitlines() if len(line.split()) >= 8)


def status(lab: Lab, gw: str) -> dict[str, Any] | None:
    res = lab.ns(gw, [*ftpalg_argv(), "status", "--json"], check=False, timeout=20)
    try:
        doc: dict[str, Any] = json.loads(res.stdout)
    except ValueError:
        return None
    return doc


def status_packets(lab: Lab, gw: str) -> int | None:
    try:
        return int((status(lab, gw) or {})["counters"].get("packets", 0))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def vm_rss(pid: int) -> int:
    """VmRSS of a process, bytes (0 if gone)."""
    try:
        m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    except OSError:
        return 0
    return int(m.group(1)) * 1024 if m else 0


def probe(lab: Lab, r: Running) -> dict[str, Any]:
    assert r.proc is not None
    return {"cpu_s": tree_cpu(r.proc.pid), "queued": queued(lab, r.gw), "status_packets": status_packets(lab, r.gw)}


# ---- sections -------------------------------------------------------------------------------
def section_rtt(lab: Lab, plan: Plan, workers_opt: bool) -> dict[str, Any]:
    variants = ["none", "kernel", "nfq-null", "ftpalg-w1"]
    rounds: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    client(lab, lab.client, ["rtt", SERVERS["vsftpd"], "--count", "300", "--warmup", "0"])  # warm-up, not counted
    for r in range(plan.rtt_rounds):
        for v in rotate(variants, r):
            try:
                with running(lab, v, [lab.gw], workers_opt):
                    ns = client(lab, lab.client, ["rtt", SERVERS["vsftpd"], "--count", str(plan.rtt_count),
                                                  "--warmup", str(plan.rtt_warmup)])["ns"]
            except LabError as e:
                say(f"rtt {v}: {e}")
                rounds[v].append({"error": str(e)[-500:]})
                continue
            row = {"p50_us": pct(ns, 50) / 1e3, "p99_us": pct(ns, 99) / 1e3, "mean_us": statistics.fmean(ns) / 1e3,
                   "ns": ns}
            rounds[v].append(row)
            say(f"rtt round {r + 1}/{plan.rtt_rounds} {v:<9}: p50 {row['p50_us']:7.1f} us  p99 {row['p99_us']:7.1f} us")
    summary = {v: {"p50_us": med([x["p50_us"] for x in rs if "p50_us" in x]),
                   "p99_us": med([x["p99_us"] for x in rs if "p99_us" in x])} for v, rs in rounds.items()}
    return {"rounds": rounds, "summary": summary}


def section_control(lab: Lab, plan: Plan, workers_opt: bool) -> dict[str, Any]:
    """Control-plane throughput: 8 logged-in connections send NOOPs (4 in flight each, a
    segment each) as fast as they are answered, through gw to vsftpd. Cheap for the
    clients and the server, so the queue handler is what limits: where several workers
    can show what they add on a machine whose cores the session benchmark fills."""
    variants = ["none", "kernel", "nfq-null", "ftpalg-w1"] + (["ftpalg-w2"] if workers_opt else [])
    rounds: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(plan.ctl_rounds):
        for v in rotate(variants, r):
            try:
                with running(lab, v, [lab.gw], workers_opt) as runs:
                    rn = runs[lab.gw]
                    before = probe(lab, rn) if rn.proc is not None else None
                    res = client(lab, lab.client, ["noops", SERVERS["vsftpd"], "--procs", str(plan.ctl_procs),
                                                   "--duration", str(plan.ctl_seconds),
                                                   "--start-at", f"{time.time() + 1.0:.3f}"],
                                 timeout=plan.ctl_seconds + 60)
                    if before is not None:
                        after = probe(lab, rn)
                        res["cpu_s"] = after["cpu_s"] - before["cpu_s"]
                        res["cpu_share"] = res["cpu_s"] / plan.ctl_seconds
            except LabError as e:
                say(f"control {v}: {e}")
                rounds[v].append({"error": str(e)[-500:]})
                continue
            rounds[v].append(res)
            cpu = f"  (handler CPU {res['cpu_share']:.0%} of a core)" if "cpu_share" in res else ""
            say(f"control round {r + 1}/{plan.ctl_rounds} {v:<9}: {res['per_s']:8.0f} NOOPs/s{cpu}")
    summary = {v: med([x["per_s"] for x in rs if "per_s" in x]) for v, rs in rounds.items()}
    return {"variants": variants, "rounds": rounds, "summary": summary}


def section_sessions(lab: Lab, plan: Plan, workers_opt: bool, partial: dict[str, Any]) -> dict[str, Any]:
    variants = ["kernel", "nfq-null", "ftpalg-w1"] + (["ftpalg-w2"] if workers_opt else [])
    where = {"client-nat": (lab.client, SERVERS["vsftpd"], None, lab.gw),
             "server-nat": (lab.server, PUBLIC_OF["vsftpd"], OUTSIDE_CLIENTS[0], lab.gw2)}
    cells: list[dict[str, Any]] = []
    partial["sessions_cells"] = cells  # in the JSON if the run is interrupted

    def one(r: int, v: str, topo: str, mode: str, runs: dict[str, Running]) -> dict[str, Any]:
        ns, host, source, gw = where[topo]
        flush_conntrack(lab)
        cell: dict[str, Any] = {"round": r, "variant": v, "topo": topo, "mode": mode}
        rn = runs[gw]
        before = probe(lab, rn) if rn.proc is not None else None
        ends = (ns, lab.server if topo == "client-nat" else lab.inside)  # the clients' and vsftpd's
        resent = sum(retransmissions(lab, e) for e in ends)
        args = ["sessions", host, "--mode", mode, "--procs", str(plan.sess_procs), "--duration", str(plan.sess_seconds),
                "--start-at", f"{time.time() + 0.8:.3f}", "--name", SMALL[0], "--size", str(SMALL[1])]
        try:
            cell.update(client(lab, ns, args + (["--source", source] if source else []),
                               timeout=plan.sess_seconds + 90))
            n = cell["ok"] + cell["late"] + cell["failed"]
            if n:
                cell["retrans_per_session"] = (sum(retransmissions(lab, e) for e in ends) - resent) / n
        except LabError as e:
            cell["error"] = str(e)[-500:]
        if before is not None:
            cell["ftpalg"] = {"before": before, "after": probe(lab, rn)}
            cell.update(per_session(cell))
        fails = f", {cell['failed']} failed {cell.get('failures', {})}" if cell.get("failed") else ""
        err = f" {cell['error']}" if "error" in cell else ""
        per = (f"  ({cell['queued_per_session']:.2f} queued, {cell['cpu_us_per_session']:.0f} us CPU per session)"
               if "queued_per_session" in cell else "")
        say(f"sessions round {r + 1}/{plan.sess_rounds} {v:<9} {topo:<10} {MODES[mode]:<7}: "
            f"{cell.get('per_s', math.nan):6.1f}/s{per}{fails}{err}")
        return cell

    # warm-up, not counted: passive sessions through gw need no ALG
    client(lab, lab.client, ["sessions", SERVERS["vsftpd"], "--mode", "PASV", "--procs", str(plan.sess_procs),
                             "--duration", "1", "--start-at", f"{time.time() + 0.5:.3f}"])
    for r in range(plan.sess_rounds):
        for v in rotate(variants, r):
            mine: list[dict[str, Any]] = []
            runs: dict[str, Running] = {}
            try:
                with running(lab, v, list(lab.gateways), workers_opt, runs):
                    for topo in TOPOS:
                        for mode in MODES:
                            if v == "nfq-null" and (topo, mode) != ("client-nat", "PASV"):
                                continue  # no ALG: only passive sessions through the client's NAT work
                            mine.append(one(r, v, topo, mode, runs))
            except LabError as e:
                say(f"sessions {v}: {e}")
                mine += [{"round": r, "variant": v, "topo": t, "mode": m, "error": str(e)[-500:]}
                         for t in TOPOS for m in MODES if not any((c["topo"], c["mode"]) == (t, m) for c in mine)
                         and (v != "nfq-null" or (t, m) == ("client-nat", "PASV"))]
            for rn in runs.values():
                m = re.findall(r"counters: (.*)", rn.log)
                for c in mine:
                    if m and where[c["topo"]][3] == rn.gw:
                        c["exit_counters"] = m[-1].strip()
                if "Traceback" in rn.log:
                    say(f"note: {v} in {rn.gw} logged a traceback")
            cells += mine
    # summary: per cell, median of the rounds
    summary: dict[str, Any] = {}
    for topo in TOPOS:
        for mode in MODES:
            key = f"{topo}/{MODES[mode]}"
            summary[key] = {}
            for v in variants:
                mine = [c for c in cells if (c["topo"], c["mode"], c["variant"]) == (topo, mode, v)]
                vals = [c["per_s"] for c in mine if "per_s" in c]
                if not mine:
                    continue
                summary[key][v] = {"per_s": med(vals), "rounds": vals}
                for fig in PER_SESSION:
                    if any(fig in c for c in mine):
                        summary[key][v][fig] = med([c[fig] for c in mine if fig in c])
    return {"variants": variants, "cells": cells, "summary": summary}


PER_SESSION = ("queued_per_session", "cpu_us_per_session", "cpu_us_per_packet", "retrans_per_session")


def per_session(cell: dict[str, Any]) -> dict[str, float]:
    """A cell's packets queued per session (the gateway's NFQUEUE id sequence), and the
    handler's CPU time (its process tree's utime + stime) per session and per queued packet:
    over every session the cell's clients ran (counted, finished late, failed)."""
    b, a = cell["ftpalg"]["before"], cell["ftpalg"]["after"]
    n = cell.get("ok", 0) + cell.get("late", 0) + cell.get("failed", 0)
    q = a["queued"] - b["queued"]
    cpu = a["cpu_s"] - b["cpu_s"]
    if n <= 0:
        return {}
    out = {"queued_per_session": q / n, "cpu_us_per_session": cpu / n * 1e6}
    if q > 0:
        out["cpu_us_per_packet"] = cpu / q * 1e6
    return out


# ---- pinned: ftpalg on a core of its own ----------------------------------------------------
PINNED = (("client-nat", "PORT"), ("server-nat", "PASV"))  # the two sessions/s targets
ALG_CPU, LOAD_CPU = "1", "0"


def cpu_times() -> dict[str, tuple[int, int]]:
    """Per core (cpu0, cpu1, ...): (busy, total) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        f = line.split()
        if f and f[0].startswith("cpu") and f[0] != "cpu":
            vals = [int(x) for x in f[1:]]
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
            out[f[0]] = (sum(vals[:8]) - idle, sum(vals[:8]))
    return out


def busy_share(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, float]:
    return {c: (after[c][0] - before[c][0]) / max(1, after[c][1] - before[c][1]) for c in after if c in before}


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p not in tree:
            tree.append(p)
            todo += [c for c, pp in parents.items() if pp == p]
    return tree


def pin(pids: list[int], cpus: str) -> None:
    """Every thread of each process (and its descendants) onto ``cpus`` (taskset's list)."""
    for root in pids:
        for p in tree_pids(root):
            subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(p)], capture_output=True, check=False)


def section_pinned(lab: Lab, plan: Plan, workers_opt: bool) -> dict[str, Any]:
    """Sessions/s with ftpalg (1 and 2 workers) pinned to core ALG_CPU and the load generator
    and the servers to core LOAD_CPU: whether the ALG or the load is what limits, and how far
    one worker would go (its CPU time per session). The kernel helper's NAT and FTP parsing
    run in the softirq of whoever sends the packet (core LOAD_CPU); ftpalg's verdicts carry a
    queued packet on through the kernel in ftpalg's context (core ALG_CPU)."""
    variants = ["kernel", "ftpalg-w1"] + (["ftpalg-w2"] if workers_opt else [])
    where = {"client-nat": (lab.client, SERVERS["vsftpd"], None, lab.gw),
             "server-nat": (lab.server, PUBLIC_OF["vsftpd"], OUTSIDE_CLIENTS[0], lab.gw2)}
    all_cpus = f"0-{(os.cpu_count() or 1) - 1}"
    servers = [p.pid for p in lab.procs if p.poll() is None]
    cells: list[dict[str, Any]] = []
    pin(servers, LOAD_CPU)
    try:
        for r in range(plan.pin_rounds):
            for v in rotate(variants, r):
                runs: dict[str, Running] = {}
                try:
                    with running(lab, v, list(lab.gateways), workers_opt, runs):
                        for rn in runs.values():
                            if rn.proc is not None:
                                pin([rn.proc.pid], ALG_CPU)
                        for topo, mode in PINNED:
                            cells.append(pinned_cell(lab, plan, r, v, topo, mode, where[topo], runs))
                except LabError as e:
                    say(f"pinned {v}: {e}")
    finally:
        pin(servers, all_cpus)
    summary: dict[str, Any] = {}
    for topo, mode in PINNED:
        key = f"{topo}/{MODES[mode]}"
        summary[key] = {}
        for v in variants:
            mine = [c for c in cells if (c["topo"], c["mode"], c["variant"]) == (topo, mode, v) and "per_s" in c]
            if mine:
                summary[key][v] = {f: med([c[f] for c in mine if f in c])
                                   for f in ("per_s", "alg_core_share", "load_core_busy", "alg_core_busy",
                                             *PER_SESSION)}
    return {"variants": variants, "alg_cpu": ALG_CPU, "load_cpu": LOAD_CPU, "cells": cells, "summary": summary}


def pinned_cell(lab: Lab, plan: Plan, r: int, v: str, topo: str, mode: str, where: tuple[str, str, str | None, str],
                runs: dict[str, Running]) -> dict[str, Any]:
    ns, host, source, gw = where
    flush_conntrack(lab)
    rn = runs[gw]
    cell: dict[str, Any] = {"round": r, "variant": v, "topo": topo, "mode": mode}
    before = probe(lab, rn) if rn.proc is not None else None
    t0 = cpu_times()
    args = ["sessions", host, "--mode", mode, "--procs", str(plan.sess_procs), "--duration", str(plan.pin_seconds),
            "--start-at", f"{time.time() + 0.8:.3f}", "--name", SMALL[0], "--size", str(SMALL[1])]
    try:
        cell.update(client(lab, ns, args + (["--source", source] if source else []), timeout=plan.pin_seconds + 90,
                           cpus=LOAD_CPU))
    except LabError as e:
        cell["error"] = str(e)[-500:]
        say(f"pinned {v} {topo} {MODES[mode]}: {e}")
        return cell
    busy = busy_share(t0, cpu_times())
    span = plan.pin_seconds + 0.8  # the clients' lead-in included: the probes bracket both
    cell["load_core_busy"] = busy.get(f"cpu{LOAD_CPU}", math.nan)
    cell["alg_core_busy"] = busy.get(f"cpu{ALG_CPU}", math.nan)
    if before is not None:
        cell["ftpalg"] = {"before": before, "after": probe(lab, rn)}
        cell.update(per_session(cell))
        cell["alg_core_share"] = (cell["ftpalg"]["after"]["cpu_s"] - before["cpu_s"]) / span
    alg = f", ftpalg {cell['alg_core_share']:.0%} of core {ALG_CPU}" if "alg_core_share" in cell else ""
    say(f"pinned round {r + 1}/{plan.pin_rounds} {v:<9} {topo:<10} {MODES[mode]:<7}: {cell['per_s']:6.1f}/s"
        f"  (core {LOAD_CPU} busy {cell['load_core_busy']:.0%}, core {ALG_CPU} {cell['alg_core_busy']:.0%}{alg})")
    return cell


# ---- restarts under load ----------------------------------------------------------------------
RESTART_KINDS = ("restart", "kill", "stop")  # restarts.HOWS: SIGUSR1, SIGKILL, SIGTERM; each + a new ftpalg run
RS_MODES = {"PORT": "PORT via MASQUERADE", "PASV": "PASV via DNAT"}


def section_restarts(lab: Lab, plan: Plan, workers_opt: bool) -> dict[str, Any]:
    """Sessions lost while ftpalg is stopped and started 3 times during ``rs_sessions``
    sessions from ``rs_clients`` clients (ftpalg.lab.restarts: the same load and restarts as
    tests/test_netns_restart.py), per mode and kind of stop; the same load through the
    kernel helper and through an ftpalg left running, for comparison (lost, seconds). Then
    2 workers, no restart: ``w2_sessions`` passive sessions through DNAT from one address,
    vsftpd handing out 12 passive ports (each reused by sessions tens of ms apart)."""
    out: dict[str, Any] = {"sessions": plan.rs_sessions, "clients": plan.rs_clients, "runs": []}

    def record(mode: str, kind: str, o: restarts.Outcome | None, err: str = "") -> None:
        row: dict[str, Any] = {"mode": mode, "kind": kind}
        if o is None:
            row["error"] = err[-500:]
            say(f"restarts {mode} {kind}: {err[-300:]}")
        else:
            row.update(lost=o.lost, sessions=o.load["sessions"], seconds=o.load["seconds"],
                       session_max_s=o.load.get("session_max_s"), failures=o.load["failures"][:3],
                       stops=[{"how": st.how, "rc": st.rc, "rules_kept": st.rules_kept,
                               "seconds": round(st.seconds, 2)} for st in o.stops],
                       final_rc=o.final_rc)
            gap = f", signal to bound {max(st.seconds for st in o.stops):.1f} s at most" if o.stops else ""
            say(f"restarts {RS_MODES[mode]:<19} {kind:<9}: lost {o.lost} of {o.load['sessions']} "
                f"in {o.load['seconds']:.1f} s, {len(o.stops)} stops{gap}, "
                f"slowest session {o.load.get('session_max_s')} s"
                + (f"; {o.load['failures'][:2]}" if o.lost else ""))
        out["runs"].append(row)

    for mode in RS_MODES:
        gw = restarts.gateway(lab, mode)
        flush_conntrack(lab)
        try:  # the kernel helper, the same load
            with running(lab, "kernel", [gw], workers_opt):
                ld = restarts.load(lab, mode, plan.rs_sessions, plan.rs_clients)
                o_out, o_err = ld.communicate(timeout=600)
            record(mode, "kernel", restarts.Outcome(json.loads(o_out), stderr=o_err))
        except (LabError, ValueError, subprocess.TimeoutExpired) as e:
            record(mode, "kernel", None, str(e))
        for kind in ("none", *RESTART_KINDS):
            flush_conntrack(lab)
            try:
                record(mode, kind, restarts.under_load(lab, mode, [] if kind == "none" else [kind] * 3,
                                                       plan.rs_sessions, plan.rs_clients))
            except (LabError, subprocess.TimeoutExpired) as e:
                record(mode, kind, None, str(e))
    if workers_opt:
        flush_conntrack(lab)
        try:
            with lab.vsftpd_passive_ports(40300, 40311):
                record("PASV", "workers-2", restarts.under_load(lab, "PASV", [], plan.w2_sessions, plan.rs_clients,
                                                                args=("--workers", "2")))
        except (LabError, subprocess.TimeoutExpired) as e:
            record("PASV", "workers-2", None, str(e))
    return out


def section_throughput(lab: Lab, plan: Plan, workers_opt: bool) -> dict[str, Any]:
    variants = ["none", "kernel", "ftpalg-w1"]
    size = plan.tp_mib << 20
    name = f"suite-{plan.tp_mib}M.bin"
    path = lab.files / name
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: nothing written, zeros read
    path.chmod(0o644)
    rounds: dict[str, list[float]] = {v: [] for v in variants}
    try:
        client(lab, lab.client, ["download", SERVERS["vsftpd"], name, "--size", str(size)])  # warm-up, not counted
        for r in range(plan.tp_rounds):
            for v in rotate(variants, r):
                flush_conntrack(lab)
                try:
                    with running(lab, v, [lab.gw], workers_opt):
                        res = client(lab, lab.client, ["download", SERVERS["vsftpd"], name, "--size", str(size)])
                except LabError as e:
                    say(f"throughput {v}: {e}")
                    continue
                mbs = res["bytes"] / res["seconds"] / 1e6
                rounds[v].append(mbs)
                say(f"throughput round {r + 1}/{plan.tp_rounds} {v:<9}: {mbs:7.0f} MB/s")
    finally:
        path.unlink(missing_ok=True)
    return {"bytes": size, "rounds": rounds, "summary": {v: med(x) for v, x in rounds.items()}}


def section_core(plan: Plan) -> dict[str, Any]:
    res = run([PY, CORE, "cost", "--packets", str(plan.core_packets)], timeout=300)
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    say(f"core: fast path {out['fast_client_line']['median_us']:.1f} / {out['fast_server_reply']['median_us']:.1f} us "
        f"(line / reply), PORT rewritten {out['rewrite_port']['median_us']:.1f} us, reply on a corrected flow "
        f"{out['corrected_server_reply']['median_us']:.1f} us (medians)")
    return out


def section_memory(plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, extra in (("rss", []), ("tracemalloc", ["--trace"])):
        res = run([PY, CORE, "memory", "--conns", str(plan.mem_conns), *extra], timeout=600)
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])
        say(f"memory ({kind}): {out[kind]['bytes_per_conn']:.0f} bytes per tracked connection, "
            f"tracked {out[kind]['tracked']}")
        if out[kind]["tracked"] != plan.mem_conns:
            say(f"note: the core tracks {out[kind]['tracked']} connections, not {plan.mem_conns}")
    return out


def section_lab_memory(lab: Lab, plan: Plan, workers_opt: bool) -> dict[str, Any]:
    """ftpalg's RSS growth with ``lab_conns`` idle control connections through gw (PASV
    sent, so each is tracked: ftpalg sees only what may carry an address), opened at 1000/s
    from 20 client addresses to the flood server (pyftpdlib, no connection cap), held until
    counted."""
    from ftpalg.lab import floods

    floods.start_server(lab)
    sources = floods.add_client_addresses(lab, 20)
    flush_conntrack(lab)
    out: dict[str, Any] = {"conns": plan.lab_conns}
    rate = 1000
    hold = plan.lab_conns / rate + 20  # ends early: the suite stops it once counted
    with running(lab, "ftpalg-w1", [lab.gw], workers_opt) as runs:
        proc = runs[lab.gw].proc
        assert proc is not None
        pid = proc.pid
        st = status(lab, lab.gw) or {}
        out["rss_before"], out["tracked_before"] = vm_rss(pid), int(st.get("tracked", 0))
        flood = subprocess.Popen(["ip", "netns", "exec", lab.client, PY, "-m", "ftpalg.lab.floods", "connect",
                                  floods.FLOOD_SERVER, *[a for s in sources for a in ("--source", s)],
                                  "--count", str(plan.lab_conns), "--rate", str(rate), "--hold", f"{hold:.0f}",
                                  "--say", "PASV"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        try:
            deadline = time.monotonic() + plan.lab_conns / rate + 15
            best = (0, 0)  # tracked, rss
            still = 0
            while time.monotonic() < deadline and flood.poll() is None:
                time.sleep(0.5)
                tracked = int((status(lab, lab.gw) or {}).get("tracked", 0))
                if tracked > best[0]:
                    best, still = (tracked, vm_rss(pid)), 0
                else:
                    still += 1
                if best[0] >= plan.lab_conns or (best[0] and still >= 4):
                    best = (best[0], max(best[1], vm_rss(pid)))
                    break
        finally:
            if flood.poll() is None:
                flood.terminate()
            try:
                flood.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                flood.kill()
                flood.communicate()
        out["tracked_peak"], out["rss_peak"] = best
    grown = out["tracked_peak"] - out["tracked_before"]
    out["bytes_per_conn"] = (out["rss_peak"] - out["rss_before"]) / grown if grown > 0 else math.nan
    say(f"lab memory: ftpalg tracked {out['tracked_peak']} connections, RSS {out['rss_before'] / 2**20:.1f} -> "
        f"{out['rss_peak'] / 2**20:.1f} MiB: {out['bytes_per_conn']:.0f} bytes per connection")
    return out


def section_pinholes(lab: Lab, plan: Plan) -> dict[str, Any]:
    run(["ip", "netns", "exec", lab.gw, PY, GWTOOL, "rules-up"])
    holder = subprocess.Popen(["ip", "netns", "exec", lab.client, PY, CLIENT, "hold", SERVERS["vsftpd"],
                               "--count", str(plan.ph_conns)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        if not line:
            raise LabError("the idle control connections did not open")
        held = json.loads(line)
        masters = [[held["local"], port, SERVERS["vsftpd"], 21, GW_PUBLIC, 40000 + i]
                   for i, port in enumerate(held["ports"])]
        res = run(["ip", "netns", "exec", lab.gw, PY, GWTOOL, "pinholes", "--rounds", str(plan.ph_rounds)],
                  input=json.dumps(masters), timeout=300)
        out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        try:
            holder.wait(15)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
        run(["ip", "netns", "exec", lab.gw, PY, GWTOOL, "rules-down"], check=False)
    for k in ("open", "close"):
        ns, nl = out[f"{k}_ns"], out[f"{k}_netlink_ns"]
        out[k] = {"n": len(ns), "p50_us": pct(ns, 50) / 1e3, "p99_us": pct(ns, 99) / 1e3,
                  "mean_us": statistics.fmean(ns) / 1e3 if ns else math.nan,
                  "netlink_p50_us": pct(nl, 50) / 1e3, "requests": out[f"requests_per_{k}"],
                  "waits": out.get(f"waits_per_{k}", out[f"requests_per_{k}"])}
    o, c = out["open"], out["close"]
    say(f"pinholes on {plan.ph_conns} control connections x {plan.ph_rounds}: open p50 {o['p50_us']:.1f} "
        f"p99 {o['p99_us']:.1f} us ({o['requests']:.0f} netlink requests in {o['waits']:.0f} waits: "
        f"{o['netlink_p50_us']:.1f} us), close p50 {c['p50_us']:.1f} p99 {c['p99_us']:.1f} us "
        f"({c['requests']:.0f} in {c['waits']:.0f}: {c['netlink_p50_us']:.1f} us)"
        + (f", errors {out['errors']}" if out["errors"] else ""))
    return out


# ---- the summary ----------------------------------------------------------------------------
COLS = ["none", "kernel", "nfq-null", "ftpalg-w1", "ftpalg-w2"]
TARGETED = ("client-nat/active", "server-nat/passive")  # the issue's: PORT via MASQUERADE, PASV via DNAT


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "not met")


def fmt(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def summary_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows: metric, values per variant column, ratio, target, met."""
    rows: list[dict[str, Any]] = []

    def row(metric: str, vals: dict[str, Any], ratio: str = "", target: str = "", met: str = "",
            digits: int = 1) -> None:
        rows.append({"metric": metric, "values": {c: vals.get(c) for c in COLS}, "ratio": ratio, "target": target,
                     "met": met, "digits": digits})

    if "rtt" in res:
        s = res["rtt"]["summary"]
        k, alg = s["kernel"], s["ftpalg-w1"]
        d50 = alg["p50_us"] - k["p50_us"]
        r99 = alg["p99_us"] / k["p99_us"] if k["p99_us"] else math.nan
        row("NOOP RTT p50 (us)", {v: x["p50_us"] for v, x in s.items()}, f"w1-k {d50:+.1f} us",
            "<= kernel + 10 us", verdict(None if math.isnan(d50) else d50 <= 10))
        row("NOOP RTT p99 (us)", {v: x["p99_us"] for v, x in s.items()}, f"w1/k {r99:.2f}x")
    if "control" in res:
        s = res["control"]["summary"]
        k, null, w1, w2 = (s.get(v, math.nan) for v in ("kernel", "nfq-null", "ftpalg-w1", "ftpalg-w2"))
        r2 = w2 / w1 if w1 and not math.isnan(w2) else math.nan
        row(f"NOOPs/s, {res['plan']['ctl_procs']} connections", s,
            f"w1/k {w1 / k:.2f}x, w1/null {w1 / null:.2f}x" + ("" if math.isnan(r2) else f", w2/w1 {r2:.2f}x"),
            digits=0)
    if "sessions" in res:
        summ = res["sessions"]["summary"]
        for key, per in summ.items():
            k, w1 = per["kernel"]["per_s"], per["ftpalg-w1"]["per_s"]
            w2 = per.get("ftpalg-w2", {}).get("per_s")
            null = per.get("nfq-null", {}).get("per_s")
            r1 = w1 / k if k else math.nan
            ratio = (f"w1/k {r1:.2f}x" + (f", w1/null {w1 / null:.2f}x" if null and not math.isnan(null) else "")
                     + (f", w2/w1 {w2 / w1:.2f}x" if w2 is not None and w1 else ""))
            targeted = key in TARGETED
            row(f"sessions/s {key}", {v: x["per_s"] for v, x in per.items()}, ratio,
                "w1 >= 1.00x kernel" if targeted else "", verdict(None if math.isnan(r1) else r1 >= 1.0)
                if targeted else "")
        for key, per in summ.items():
            q = {v: x.get("queued_per_session") for v, x in per.items()}
            w1q = q.get("ftpalg-w1")
            row(f"queued per session {key}", q, "", "w1 <= 4",
                verdict(None if w1q is None or math.isnan(w1q) else w1q <= 4), digits=2)
        for key, per in summ.items():
            row(f"TCP retransmissions per session {key}", {v: x.get("retrans_per_session") for v, x in per.items()},
                "clients' and server's, any segment", digits=2)
        for key, per in summ.items():
            c = {v: x.get("cpu_us_per_session") for v, x in per.items()}
            pk = per.get("ftpalg-w1", {}).get("cpu_us_per_packet")
            row(f"handler CPU us per session {key}", c, "" if pk is None else f"w1 {pk:.0f} us per queued packet",
                digits=0)
    if "pinned" in res:
        pn = res["pinned"]
        for key, per in pn["summary"].items():
            k, w1 = per.get("kernel", {}).get("per_s", math.nan), per.get("ftpalg-w1", {}).get("per_s", math.nan)
            w2 = per.get("ftpalg-w2", {}).get("per_s")
            ratio = f"w1/k {w1 / k:.2f}x" + (f", w2/w1 {w2 / w1:.2f}x" if w2 else "")
            row(f"pinned sessions/s {key}", {v: x["per_s"] for v, x in per.items()}, ratio)
            share = {v: f"{x['alg_core_share']:.0%}" for v, x in per.items()
                     if not math.isnan(x.get("alg_core_share", math.nan))}
            load = per.get("ftpalg-w1", per.get("kernel", {})).get("load_core_busy", math.nan)
            row(f"pinned: ftpalg's share of core {pn['alg_cpu']} {key}", share,
                f"core {pn['load_cpu']} (load, servers) {load:.0%} busy")
            ceiling = {v: 1e6 / x["cpu_us_per_session"] for v, x in per.items()
                       if x.get("cpu_us_per_session") and not math.isnan(x["cpu_us_per_session"])}
            row(f"pinned: ceiling of ftpalg's core, sessions/s {key}", ceiling, "1 s / CPU per session", digits=0)
    if "restarts" in res:
        rs = res["restarts"]
        by = {(x["mode"], x["kind"]): x for x in rs["runs"]}
        for mode, label in RS_MODES.items():
            base = by.get((mode, "none"), {})
            kern = by.get((mode, "kernel"), {})
            for kind, what in (("restart", "3x restart (SIGUSR1)"), ("kill", "3x kill -9"),
                               ("stop", "3x stop+start (SIGTERM)")):
                x = by.get((mode, kind), {})
                lost = x.get("lost")
                note = (f"{x['seconds']:.1f} s (no restart {base.get('seconds', math.nan):.1f} s, kernel "
                        f"{kern.get('seconds', math.nan):.1f} s), slowest session {x.get('session_max_s')} s"
                        if "seconds" in x else x.get("error", "")[:60])
                targeted = kind != "stop"  # a stop and a start is not a restart: nothing is kept
                row(f"sessions lost of {rs['sessions']}, {label}, {what}",
                    {"kernel": kern.get("lost"), "ftpalg-w1": lost}, note, "0" if targeted else "",
                    verdict(None if lost is None else lost == 0) if targeted else "", digits=0)
        w2 = by.get(("PASV", "workers-2"))
        if w2 is not None:
            row(f"sessions lost of {w2.get('sessions', res['plan']['w2_sessions'])}, PASV via DNAT, 2 workers, "
                "12 passive ports", {"ftpalg-w2": w2.get("lost")},
                f"{w2['seconds']:.1f} s" if "seconds" in w2 else w2.get("error", "")[:60], "0",
                verdict(None if w2.get("lost") is None else w2["lost"] == 0), digits=0)
    if "throughput" in res:
        s = res["throughput"]["summary"]
        r = s["ftpalg-w1"] / s["kernel"] if s.get("kernel") else math.nan
        row(f"PASV download {res['throughput']['bytes'] >> 20} MiB (MB/s)", s, f"w1/k {r:.3f}x", ">= 0.99x kernel",
            verdict(None if math.isnan(r) else r >= 0.99), digits=0)
    if "core" in res:
        c = res["core"]
        fast = (c["fast_client_line"]["median_us"] + c["fast_server_reply"]["median_us"]) / 2
        row("core us/packet fast (NOOP, 200)", {"ftpalg-w1": fast})
        row("core us/packet PORT rewritten", {"ftpalg-w1": c["rewrite_port"]["median_us"]},
            f"{c['rewrite_port']['median_us'] / fast:.1f}x fast")
        row("core us/packet reply, corrected flow", {"ftpalg-w1": c["corrected_server_reply"]["median_us"]})
    if "memory" in res:
        m = res["memory"]
        t = m["tracemalloc"]["bytes_per_conn"]
        row(f"memory B/conn at {m['tracemalloc']['tracked']} (tracemalloc)", {"ftpalg-w1": t}, "", "<= 3072 B",
            verdict(t <= 3072), digits=0)
        row("memory B/conn (RSS delta)", {"ftpalg-w1": m["rss"]["bytes_per_conn"]}, digits=0)
    if "lab-memory" in res:
        lm = res["lab-memory"]
        row(f"memory B/conn, lab ftpalg RSS, {lm['tracked_peak']} idle", {"ftpalg-w1": lm["bytes_per_conn"]}, digits=0)
    if "pinholes" in res:
        p = res["pinholes"]
        row("pinhole open p50 / p99 (us)", {"ftpalg-w1": f"{p['open']['p50_us']:.1f}/{p['open']['p99_us']:.1f}"},
            "", "open p99 <= 50 us", verdict(p["open"]["p99_us"] <= 50 if p["open"]["n"] else None))
        row("pinhole close p50 / p99 (us)", {"ftpalg-w1": f"{p['close']['p50_us']:.1f}/{p['close']['p99_us']:.1f}"})
    return rows


def print_table(rows: list[dict[str, Any]]) -> str:
    head = ["metric", *[LABELS[c] for c in COLS], "ratio", "target", "met?"]
    body = [[r["metric"], *[fmt(r["values"][c], r["digits"]) for c in COLS], r["ratio"], r["target"], r["met"]]
            for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    lines = []
    for i, x in enumerate([head, *body]):
        lines.append(" | ".join(str(v).ljust(w) if j in (0, len(head) - 3, len(head) - 2, len(head) - 1)
                                else str(v).rjust(w) for j, (v, w) in enumerate(zip(x, widths, strict=True))).rstrip())
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text)
    return text


def plot(res: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not importable: no PNG (pip install 'ftpalg[bench]' or matplotlib)")
        return False
    fig, axes = plt.subplots(2, 3, figsize=(18, 9))
    colors = {"none": "#999999", "kernel": "#1f77b4", "nfq-null": "#bcbd22", "ftpalg-w1": "#d62728",
              "ftpalg-w2": "#ff7f0e"}

    def bars(ax: Any, groups: list[str], series: dict[str, list[float]], title: str, ylabel: str) -> None:
        n = max(1, len(series))
        w = 0.8 / n
        for i, (name, vals) in enumerate(series.items()):
            xs = [g + (i - (n - 1) / 2) * w for g in range(len(groups))]
            ax.bar(xs, [0 if math.isnan(v) else v for v in vals], w, label=LABELS.get(name, name),
                   color=colors.get(name))
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)

    def cells(ax: Any, sec: dict[str, Any], fig: str, variants: list[str], title: str, ylabel: str) -> None:
        """A section's summary, one group of bars per cell (its keys), one bar per variant."""
        groups = list(sec["summary"])
        bars(ax, groups, {v: [sec["summary"][g].get(v, {}).get(fig, math.nan) for g in groups] for v in variants},
             title, ylabel)

    ax = axes[0][0]
    if "sessions" in res:
        cells(ax, res["sessions"], "per_s", res["sessions"]["variants"],
              f"sessions/s ({res['plan']['sess_procs']} clients, vsftpd, median of rounds)", "sessions/s")
    else:
        ax.set_axis_off()
    ax = axes[0][1]
    if "rtt" in res:
        s = res["rtt"]["summary"]
        bars(ax, ["p50", "p99"], {v: [x["p50_us"], x["p99_us"]] for v, x in s.items()}, "NOOP round trip", "us")
    else:
        ax.set_axis_off()
    ax = axes[1][0]
    if "throughput" in res:
        s = res["throughput"]["summary"]
        bars(ax, [f"PASV {res['throughput']['bytes'] >> 20} MiB"], {v: [x] for v, x in s.items()},
             "one large download through gw", "MB/s")
    else:
        ax.set_axis_off()
    ax = axes[1][1]
    if "sessions" in res:
        cells(ax, res["sessions"], "cpu_us_per_session", res["sessions"]["variants"][1:],
              "queue handler CPU per session (utime + stime)", "us")
    else:
        ax.set_axis_off()
    ax = axes[0][2]
    if "control" in res:
        s = res["control"]["summary"]
        bars(ax, [f"{res['plan']['ctl_procs']} connections"], {v: [x] for v, x in s.items()},
             "control plane: NOOPs answered per second", "NOOPs/s")
    else:
        ax.set_axis_off()
    ax = axes[1][2]
    if "pinned" in res:
        pn = res["pinned"]
        cells(ax, pn, "per_s", pn["variants"],
              f"sessions/s, ftpalg pinned to core {pn['alg_cpu']}, load and servers to core {pn['load_cpu']}",
              "sessions/s")
    else:
        ax.set_axis_off()
    m = res["machine"]
    fig.suptitle(f"ftpalg bench/suite.py  {m['date']}  {m['nproc']} cores  kernel {m['kernel']}  "
                 f"commit {m['commit'][:10]}{' (dirty)' if m['dirty'] else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def machine() -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    cpu = ""
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1) if m else ""
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "python": platform.python_version(),
            "commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "loadavg_start": os.getloadavg()}


# ---- main -----------------------------------------------------------------------------------
def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="short rounds, a smoke test (~4 min)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="where suite.json and suite.png go")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}")
    if os.geteuid() != 0:
        print("bench/suite.py: run as root (network namespaces, iptables, NFQUEUE)", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else Plan()
    # Ctrl-C (even when started from a shell that ignores SIGINT for background jobs),
    # SIGTERM and SIGHUP (unless ignored: nohup) all end up in the clean-up below
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _terminate)
    workers_opt = has_workers()
    res: dict[str, Any] = {"machine": machine(), "plan": asdict(plan), "quick": args.quick, "sections": only,
                           "notes": []}
    if not workers_opt and "sessions" in only:
        note = "`ftpalg run --help` has no --workers: the 2-worker variant is skipped"
        res["notes"].append(note)
        say(f"note: {note}")
    m = res["machine"]
    say(f"{m['nproc']} cores, kernel {m['kernel']}, python {m['python']}, commit {m['commit'][:10]}"
        f"{' (dirty)' if m['dirty'] else ''}; sections {', '.join(only)}{' (quick)' if args.quick else ''}")
    args.out.mkdir(parents=True, exist_ok=True)
    lab = Lab(f"fb{os.getpid()}")
    interrupted = failed = False
    try:
        if "core" in only:
            res["core"] = section_core(plan)
        if "memory" in only:
            res["memory"] = section_memory(plan)
        if any(s in only for s in LAB_SECTIONS):
            lab.up()
            say(f"lab {lab.prefix} up")
            for name in LAB_SECTIONS:
                if name not in only:
                    continue
                if name == "rtt":
                    res["rtt"] = section_rtt(lab, plan, workers_opt)
                elif name == "control":
                    res["control"] = section_control(lab, plan, workers_opt)
                elif name == "sessions":
                    res["sessions"] = section_sessions(lab, plan, workers_opt, res.setdefault("partial", {}))
                    res.pop("partial")
                elif name == "pinned":
                    res["pinned"] = section_pinned(lab, plan, workers_opt)
                elif name == "restarts":
                    res["restarts"] = section_restarts(lab, plan, workers_opt)
                elif name == "throughput":
                    res["throughput"] = section_throughput(lab, plan, workers_opt)
                elif name == "lab-memory":
                    res["lab-memory"] = section_lab_memory(lab, plan, workers_opt)
                else:
                    res["pinholes"] = section_pinholes(lab, plan)
    except KeyboardInterrupt as e:
        interrupted = True
        say(f"interrupted ({str(e) or 'SIGINT'}): tearing the lab down, writing what was measured")
    except Exception as e:  # a broken section: still tear down and keep what was measured
        failed = True
        traceback.print_exc()
        res["notes"].append(f"stopped by {type(e).__name__}: {str(e)[-500:]}")
        say(f"failed ({type(e).__name__}): tearing the lab down, writing what was measured")
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the clean-up
            lab.down()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            left = lab.leftovers()
            if left:
                print(f"warning: namespaces left behind: {left}", file=sys.stderr)
    res["elapsed_s"] = round(time.monotonic() - T0, 1)
    res["machine"]["loadavg_end"] = os.getloadavg()
    try:
        rows = summary_rows(res)
    except Exception as e:  # a section that failed half-way: the JSON still has its numbers
        rows = []
        res["notes"].append(f"no summary table: {type(e).__name__}: {e}")
    res["summary"] = [{k: v for k, v in r.items() if k != "digits"} for r in rows]
    out_json = args.out / "suite.json"
    out_json.write_text(json.dumps(res, indent=1, default=str))
    print()
    if rows:
        print(f"bench/suite.py{' --quick' if args.quick else ''}: {res['elapsed_s']:.0f} s"
              f"{' (INTERRUPTED: partial)' if interrupted else ' (FAILED: partial)' if failed else ''}; "
              f"medians across rounds; targets are reported, not asserted")
        la, lb = res["machine"]["loadavg_start"][0], res["machine"]["loadavg_end"][0]
        print(f"{m['nproc']} cores, load average {la:.1f} at the start, {lb:.1f} at the end"
              + (" (other work on this machine: every number is noisy)" if max(la, lb) > 1.5 else ""))
        res["table"] = print_table(rows)
        out_json.write_text(json.dumps(res, indent=1, default=str))
        if plot(res, args.out / "suite.png"):
            print(f"\nwrote {out_json} and {args.out / 'suite.png'}")
        else:
            print(f"\nwrote {out_json}")
    else:
        print(f"wrote {out_json} (partial)")
    for note in res["notes"]:
        print(f"note: {note}")
    return 130 if interrupted else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
