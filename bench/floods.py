"""Floods against the lab's client-NAT gateway while legitimate sessions go on: is ftpalg's
memory bounded, do its caps hold, do legitimate sessions still work? The same floods with the
kernel's FTP helper instead of ftpalg, for comparison.

    .venv/bin/python bench/floods.py [--json FILE] [--scale 1.0] [--floods syn,synmax,connect,idle,abandon]
                                     [--variants small,default,kernel]                       (root)

Floods (ftpalg.lab.floods), from the lab's client namespace towards a flood server at
203.0.113.60 (pyftpdlib, one IOLoop, no connection cap), from extra client addresses:

  syn      SYNs to port 21 from many source ports (raw socket), 3000/s
  synmax   the same at 10000/s: more than ftpalg keeps up with (the queue fills and fails open)
  connect  TCP connections that read the greeting and close at once
  idle     TCP connections that send NOOP and then all stay open, idle, for a few seconds
           (more than the small variant's --max-flows)
  abandon  control connections that log in, send PORT and are abandoned without QUIT (30
           client addresses: more per client than --max-pinholes-per-client)

Meanwhile legitimate PORT sessions (log in, RETR small.txt checked by SHA-256, QUIT) run back
to back from another client address against vsftpd and pyftpdlib. Variants: ftpalg with
small caps (--max-flows 2000 --max-pinholes 1000), ftpalg with its defaults, and the kernel's
nf_conntrack_ftp (iptables -t raw ... -j CT --helper ftp) instead of ftpalg. ftpalg restarts
for every flood, so its counters (from its exit log) are per flood; its RSS is sampled during
the flood (VmRSS max) and its peak read at the end (VmHWM). Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftpalg.lab import floods  # noqa: E402
from ftpalg.lab.lab import CLIENTS, SERVERS, Lab, sha256  # noqa: E402

HELPER = ["PREROUTING", "-p", "tcp", "--dport", "21", "-j", "CT", "--helper", "ftp"]
VARIANTS = {
    "small": ["--max-flows", "2000", "--max-pinholes", "1000"],
    "default": [],
    "kernel": None,
}
COUNTERS = ("packets", "flows", "flows_evicted", "flow_cap", "syns_forgotten", "pinholes_opened", "pinhole_cap",
            "client_pinhole_cap", "held_cap", "pinhole_failed", "faults", "rewrites")
LEGIT_TARGETS = ("vsftpd", "pyftpdlib")


def floods_plan(scale: float) -> dict[str, tuple[list[str], float]]:
    """flood -> (arguments of ``python -m ftpalg.lab.floods``, without target and sources;
    seconds the legitimate sessions run alongside)."""
    n = lambda x: str(max(1, int(x * scale)))  # noqa: E731
    return {
        "syn": (["syn", "--rate", "3000", "--duration", n(6)], 6 * scale),
        "synmax": (["syn", "--rate", "10000", "--duration", n(5)], 5 * scale),
        "connect": (["connect", "--count", n(2000), "--rate", "400"], 5 * scale),
        "idle": (["connect", "--count", n(2500), "--rate", "600", "--hold", "3", "--say", "NOOP"], 4 * scale + 3),
        "abandon": (["abandon", "--count", n(2000), "--mode", "PORT", "--hold", "3", "--workers", "24"],
                    5 * scale + 3),
    }


class Sampler(threading.Thread):
    """Samples ftpalg's VmRSS and the gateway's queue (waiting packets, drops) until stopped."""

    def __init__(self, lab: Lab, pid: int | None) -> None:
        super().__init__(daemon=True)
        self.lab, self.pid = lab, pid
        self.rss_max = 0
        self.queue_max = 0
        self.queue_dropped = 0
        self.queue_user_dropped = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.25):
            if self.pid is not None:
                self.rss_max = max(self.rss_max, vm(self.pid).get("VmRSS", 0))
            q = self.lab.ns(self.lab.gw, ["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False).stdout.split()
            if len(q) >= 7:
                self.queue_max = max(self.queue_max, int(q[2]))
                self.queue_dropped, self.queue_user_dropped = int(q[5]), int(q[6])


def vm(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process, in kB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)


def start_legit(lab: Lab, seconds: float) -> list[subprocess.Popen[str]]:
    want = sha256(lab.files / "small.txt")
    return [subprocess.Popen(["ip", "netns", "exec", lab.client, sys.executable, "-m", "ftpalg.lab.floods", "legit",
                              SERVERS[k], "--source", CLIENTS[1], "--duration", f"{seconds:.1f}", "--sha256", want,
                              "--workers", "1"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
            for k in LEGIT_TARGETS]


def finish_legit(procs: list[subprocess.Popen[str]]) -> dict[str, Any]:
    tried = ok = 0
    failures: dict[str, int] = {}
    for p in procs:
        out, _ = p.communicate(timeout=120)
        r = json.loads(out.strip().splitlines()[-1])
        tried, ok = tried + r["tried"], ok + r["ok"]
        for why, k in r["failures"].items():
            failures[why] = failures.get(why, 0) + k
    return {"tried": tried, "ok": ok, "failures": failures}


def counters(log: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", log.rsplit("counters:", 1)[-1])} if "counters:" in log \
        else {}


def one(lab: Lab, variant: str, flood: str, plan: tuple[list[str], float] | None,
        sources: dict[str, list[str]]) -> dict[str, Any]:
    lab.ns(lab.gw, ["conntrack", "-F"], check=False)
    args = VARIANTS[variant]
    p = None
    if args is None:
        lab.ns(lab.gw, ["iptables", "-t", "raw", "-A", *HELPER])
    else:
        p = lab.start_ftpalg(*args)
    row: dict[str, Any] = {"variant": variant, "flood": flood}
    sampler = Sampler(lab, p.pid if p else None)
    sampler.start()
    try:
        legit = start_legit(lab, plan[1] if plan else 3.0)
        if plan:
            src = [a for s in sources[flood] for a in ("--source", s)]
            res = lab.ns(lab.client, [sys.executable, "-m", "ftpalg.lab.floods", *plan[0][:1], floods.FLOOD_SERVER,
                                      *src, *plan[0][1:]], check=False, timeout=300)
            row["flood_result"] = json.loads(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else \
                {"error": res.stderr[-500:]}
        row["legit"] = finish_legit(legit)
        row["conntrack_entries"] = int(lab.ns(lab.gw, ["conntrack", "-C"], check=False).stdout.strip() or 0)
        if p is not None:
            peak = vm(p.pid)
            row["rss_kb"] = peak.get("VmRSS")
            row["hwm_kb"] = peak.get("VmHWM")
            row["cpu_s"] = cpu_seconds(p.pid)
    finally:
        sampler.stopped.set()
        sampler.join()
        if p is not None:
            lab.stop_ftpalg(p)
        else:
            lab.ns(lab.gw, ["iptables", "-t", "raw", "-D", *HELPER], check=False)
    row["rss_max_kb"] = sampler.rss_max or None
    row["queue_max"], row["queue_dropped"] = sampler.queue_max, sampler.queue_dropped
    row["queue_user_dropped"] = sampler.queue_user_dropped
    time.sleep(0.5)
    row["expectations_after"] = len(lab.expectations())
    if p is not None:
        log = lab.ftpalg_log()
        row["counters"] = {k: v for k, v in counters(log).items() if k in COUNTERS}
        row["tracebacks"] = log.count("Traceback")
        row["fail_open"] = "fails open" in log
    return row


def show(rows: list[dict[str, Any]]) -> None:
    print(f"{'variant':<8} {'flood':<8} {'legit ok':>10} {'sent':>7} {'rss MB':>7} {'peak MB':>8} {'cpu s':>6} "
          f"{'queue':>6} {'qdrop':>6} {'exp':>4}  counters / flood result")
    for r in rows:
        lg = r["legit"]
        fr = r.get("flood_result", {})
        sent = fr.get("sent", fr.get("connections", ""))
        rss = f"{r['rss_max_kb'] / 1024:.1f}" if r.get("rss_max_kb") else "-"
        hwm = f"{r['hwm_kb'] / 1024:.1f}" if r.get("hwm_kb") else "-"
        c = r.get("counters", {})
        detail = " ".join(f"{k}={v}" for k, v in c.items() if k != "rewrites")
        extra = {k: v for k, v in fr.items() if k not in ("flood", "sent", "connections", "mode")}
        cpu = r.get("cpu_s")
        print(f"{r['variant']:<8} {r['flood']:<8} {lg['ok']:>4}/{lg['tried']:<5} {sent!s:>7} {rss:>7} {hwm:>8} "
              f"{cpu if cpu is not None else '-'!s:>6} "
              f"{r['queue_max']:>6} {r['queue_dropped'] + r['queue_user_dropped']:>6} {r['expectations_after']:>4}  "
              f"{detail}")
        print(f"{'':<17} flood: {json.dumps(extra)}" + (f"  legit failures: {lg['failures']}" if lg["failures"]
                                                          else ""))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply flood sizes and durations")
    ap.add_argument("--floods", default="syn,synmax,connect,idle,abandon")
    ap.add_argument("--variants", default="small,default,kernel")
    args = ap.parse_args()
    plan = floods_plan(args.scale)
    wanted = ["baseline", *args.floods.split(",")]
    lab = Lab(f"fb{os.getpid()}")
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        lab.up()
        floods.start_server(lab)
        extra = floods.add_client_addresses(lab, 30)
        sources = {"syn": [CLIENTS[0]], "synmax": [CLIENTS[0]], "connect": extra, "idle": extra, "abandon": extra}
        for variant in args.variants.split(","):
            for flood in wanted:
                row = one(lab, variant, flood, plan.get(flood), sources)
                rows.append(row)
                print(f"[{time.monotonic() - t0:5.1f}s] {variant} {flood}: legit {row['legit']['ok']}/"
                      f"{row['legit']['tried']}", flush=True)
    finally:
        lab.down()
    print(f"\nlegitimate PORT sessions from {CLIENTS[1]} to {', '.join(LEGIT_TARGETS)} during each flood; "
          f"floods to {floods.FLOOD_SERVER}; {time.monotonic() - t0:.0f} s in all")
    print("rss MB: ftpalg's VmRSS, max of samples during the flood; peak MB: its VmHWM at the end; cpu s: its "
          "CPU time (ftpalg restarts for every flood); "
          "queue: most packets waiting in the kernel queue; qdrop: packets the queue dropped; "
          "exp: expectations left 0.5 s after")
    show(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
