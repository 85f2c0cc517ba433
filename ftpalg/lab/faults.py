"""Fault injection for the lab: random loss, duplication and reordering of TCP segments in a
network namespace, without ``tc netem`` (not available on the lab's kernels).

Two mechanisms, both fed by iptables rules (iptables-nft) in the namespace:

* Loss: ``-m statistic --mode random --probability P -j DROP`` (the kernel's randomness, not
  seeded). Put it where a real link loses packets: the receiving host's INPUT, or a router's
  FORWARD (``in_dev``). A DROP in OUTPUT is no loss for a local TCP sender: the kernel hands
  the error back to TCP, which sends the segment again later (a stall, not a lost segment);
  use the shuffler's seeded ``drop`` there (a queued packet dropped by a verdict is lost).
* The shuffler: an NFQUEUE process (``python -m ftpalg.lab.faults shuffle``, this module's
  ``Shuffler``) bound to a queue of its own, fed by ``-j NFQUEUE --queue-num N
  --queue-bypass`` (while nothing is bound, packets pass). For each packet it draws three
  numbers from a seeded ``random.Random`` (always three, so a run with the same seed and the
  same packets makes the same choices):

  - drop (``drop``): verdict NF_DROP.
  - duplication (``dup``): the packet is accepted and a byte-identical copy of its IP packet
    (same IP ID, TCP header, options and payload) is sent through a raw socket
    (``IPPROTO_RAW``, which implies ``IP_HDRINCL``, also for IPv6) in the same namespace.
    The copy carries the fwmark ``MARK`` (``SO_MARK``), which the queue rule excludes, so a
    copy is never queued again. ``NF_REPEAT`` cannot duplicate: it runs the same hook again
    on the same skb (the packet is queued a second time and then passes once), it never
    clones. The copy enters at the namespace's OUTPUT hook: from OUTPUT it leaves as the
    original does; from FORWARD (a router) it leaves through the route to its destination,
    past the router's OUTPUT and POSTROUTING, not FORWARD (conntrack finds the connection by
    its tuple: an SNAT connection's copy gets the same SNAT; a DNATed one's copy, already
    translated, does not match and leaves as is); from INPUT (the receiving host) it goes to
    the local address over ``lo`` (a capture on the receiving veth does not see it).
  - reordering (``reorder``): the verdict is withheld (``Packet.retain()``) for ``delay_ms``
    while later packets pass, then the packet is accepted (with its copy, if duplicated). At
    most ``max_held`` packets are held: holding one more releases the oldest at once.
    ``reordered`` counts held packets that at least one later packet overtook; ``held`` all
    that were held.

  Packets queued at the OUTPUT hook of a TCP sender are already segments of at most one MSS:
  NFQUEUE splits GSO packets when the queue is bound without ``NFQA_CFG_F_GSO``
  (netfilterqueue does not set it), and fills in checksums left to the NIC, so a copy is a
  valid packet.

On SIGTERM/SIGINT the shuffler releases every held packet, accepts what is still queued,
removes the rules it installed (``--chain``), unbinds and prints its counters as one line
(``COUNTERS_RE``): seen, passed, duplicated, held, reordered, dropped, copy_errors.

Where the rules go: ``table`` (``security`` by default: its INPUT, FORWARD and OUTPUT chains
are hooked after the filter table, priority 150 with iptables-nft, and nobody else in the lab
uses it), ``chain``, optional ``in_dev``/``out_dev`` and ``ports`` (``-m multiport --ports``:
either port, both directions; empty: all TCP). An NFQUEUE verdict ends its table's chain for
that packet (a rule after ours in the same chain would not see it): a table of its own keeps
the faults from changing what the firewall (filter) and ftpalg (mangle PREROUTING) decide.
The loss rule comes first: what it drops never reaches the shuffler. Every rule carries a
comment unique to its owner and is deleted by its exact text; chains and tables that
iptables-nft created for them are deleted when they are empty again, so the namespace's
ruleset (``nft -s list ruleset``) is as before. Nest ``Faults`` contexts in one namespace
(last in, first out): one that outlives a later one leaves that one's table behind.

Use ``Faults`` from tests and benchmarks::

    with Faults(ns, chain="OUTPUT", dup=0.02, reorder=0.05, ports=(21,)) as f:
        ...                      # traffic
    f.counters                   # {"seen": ..., "duplicated": ..., ...}

and by hand, inside a namespace (never in the host's: both refuse to run there)::

    ip netns exec NS python -m ftpalg.lab.faults shuffle --queue 3100 --dup 0.02 \\
        --reorder 0.05 --delay-ms 20 --seed 1 --chain OUTPUT --port 21 [--loss 0.05]

Caveats: the seed fixes the sequence of decisions, not which packets they fall on when the
traffic itself varies (timers, retransmissions); the loss rule is not seeded. The shuffler is
one Python process: at some tens of thousands of packets per second it becomes the
bottleneck, and every queued packet waits for it (added latency, tens of microseconds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

MARK = 0x4000_0000
"""fwmark bit of the shuffler's copies; its queue rule skips packets that carry it."""
DEFAULT_QUEUE = 3100
QUEUE_MAXLEN = 4096
TABLES = {
    "security": ("INPUT", "FORWARD", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "raw": ("PREROUTING", "OUTPUT"),
}
_IN_CHAINS = ("PREROUTING", "INPUT", "FORWARD")  # where -i applies
_OUT_CHAINS = ("FORWARD", "OUTPUT", "POSTROUTING")  # where -o applies
NFT_FAMILY = {4: "ip", 6: "ip6"}
READY = "ftpalg-faults: bound to NFQUEUE"
COUNTER_NAMES = ("seen", "passed", "duplicated", "held", "reordered", "dropped", "copy_errors")
COUNTERS_RE = re.compile(r"^ftpalg-faults: counters (.*)$")


class FaultError(RuntimeError):
    pass


# ---- namespaces --------------------------------------------------------------------------------
def _netns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:  # e.g. PID 1's, from inside a container
        return None
    return st.st_dev, st.st_ino


def _named() -> dict[tuple[int, int], str]:
    """The named network namespaces (``ip netns``): id -> name."""
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return {}
    return {i: n for n in names if (i := _netns_id(f"/run/netns/{n}")) is not None}


def _host_ids() -> set[tuple[int, int]]:
    """What counts as the host's namespace: PID 1's (where readable), and this process's own
    unless it is a named one (``ip netns exec``)."""
    own = _netns_id("/proc/self/ns/net")
    ids = {i for i in (_netns_id("/proc/1/ns/net"),) if i is not None}
    if own is not None and own not in _named():
        ids.add(own)
    return ids


def in_host_namespace() -> bool:
    """Whether this process runs outside every named namespace, or in PID 1's."""
    own = _netns_id("/proc/self/ns/net")
    return own is None or own not in _named() or own in _host_ids()


def check_namespace(ns: str) -> None:
    """Refuse anything but a named namespace that is not the host's."""
    i = _netns_id(f"/run/netns/{ns}") if ns and "/" not in ns else None
    if i is None:
        raise FaultError(f"no network namespace {ns!r}")
    if i in _host_ids():
        raise FaultError(f"namespace {ns!r} is the host's: faults are only injected in lab namespaces")


def _in_ns(ns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv] if ns else argv


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise FaultError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


# ---- rules -------------------------------------------------------------------------------------
def _probability(name: str, p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], not {p}")
    return p


class Rules:
    """The loss rule and the queue rule in one chain of one namespace (``ns``; None: the
    current one), for each family: ``install()``, then ``remove()`` (idempotent) deletes them
    and whatever chains and tables iptables-nft created for them."""

    def __init__(self, ns: str | None, chain: str, *, table: str = "security", in_dev: str | None = None,
                 out_dev: str | None = None, ports: Iterable[int] = (), loss: float = 0.0,
                 queue: int | None = None, families: Iterable[int] = (4,), mark: int = MARK,
                 tag: str = "") -> None:
        if table not in TABLES:
            raise ValueError(f"table must be one of {sorted(TABLES)}, not {table!r}")
        if chain not in TABLES[table]:
            raise ValueError(f"the {table} table has no {chain} chain (it has {', '.join(TABLES[table])})")
        if in_dev and chain not in _IN_CHAINS:
            raise ValueError(f"{chain} has no input interface (in_dev)")
        if out_dev and chain not in _OUT_CHAINS:
            raise ValueError(f"{chain} has no output interface (out_dev)")
        self.ports = sorted({int(p) for p in ports})
        if len(self.ports) > 15:
            raise ValueError("at most 15 ports (-m multiport)")
        self.families = tuple(sorted(set(families)))
        if not self.families or any(f not in NFT_FAMILY for f in self.families):
            raise ValueError(f"families must be 4 and/or 6, not {self.families}")
        self.ns, self.chain, self.table = ns, chain, table
        self.in_dev, self.out_dev = in_dev, out_dev
        self.loss = _probability("loss", loss)
        self.queue, self.mark = queue, mark
        self.tag = tag or f"ftpalg-faults:{os.getpid()}:{id(self):x}"
        self._installed: list[tuple[int, list[str]]] = []
        self._before: dict[int, dict[str, int] | None] = {}

    def specs(self) -> list[list[str]]:
        """The rules in chain order (loss first), each as iptables arguments after the chain."""
        match = ["-p", "tcp"]
        if self.in_dev:
            match += ["-i", self.in_dev]
        if self.out_dev:
            match += ["-o", self.out_dev]
        if self.ports:
            match += ["-m", "multiport", "--ports", ",".join(map(str, self.ports))]
        match += ["-m", "comment", "--comment", self.tag]
        out = []
        if self.loss > 0:
            out.append([*match, "-m", "statistic", "--mode", "random", "--probability", f"{self.loss:.6f}",
                        "-j", "DROP"])
        if self.queue is not None:
            out.append([*match, "-m", "mark", "!", "--mark", f"{self.mark:#x}/{self.mark:#x}",
                        "-j", "NFQUEUE", "--queue-num", str(int(self.queue)), "--queue-bypass"])
        return out

    def _ipt(self, family: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = "iptables" if family == 4 else "ip6tables"
        return _run(_in_ns(self.ns, [cmd, "-w", "-t", self.table, *args]), check=check)

    def chains(self, family: int) -> dict[str, int] | None:
        """Our table's chains (name -> number of rules), None if the table does not exist."""
        p = _run(_in_ns(self.ns, ["nft", "-j", "list", "table", NFT_FAMILY[family], self.table]), check=False)
        if p.returncode != 0:
            return None
        out: dict[str, int] = {}
        for item in json.loads(p.stdout).get("nftables", []):
            if "chain" in item:
                out.setdefault(item["chain"]["name"], 0)
            elif "rule" in item:
                name = item["rule"]["chain"]
                out[name] = out.get(name, 0) + 1
        return out

    def install(self) -> None:
        try:
            for f in self.families:
                self._before[f] = self.chains(f)
                for spec in reversed(self.specs()):  # each inserted first: they end up in order
                    self._ipt(f, "-I", self.chain, "1", *spec)
                    self._installed.append((f, spec))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        while self._installed:
            f, spec = self._installed.pop()
            self._ipt(f, "-D", self.chain, *spec, check=False)
        fam = NFT_FAMILY
        for f, before in list(self._before.items()):
            now = self.chains(f)
            if now is None:
                del self._before[f]
                continue
            if (before is None or self.chain not in before) and now.get(self.chain, 1) == 0:
                _run(_in_ns(self.ns, ["nft", "delete", "chain", fam[f], self.table, self.chain]), check=False)
                now.pop(self.chain)
            if before is None and not any(now.values()):  # only empty chains left (older iptables-nft make all)
                _run(_in_ns(self.ns, ["nft", "delete", "table", fam[f], self.table]), check=False)
            del self._before[f]


# ---- the shuffler --------------------------------------------------------------------------------
class Shuffler:
    """Drops, duplicates and delays the packets of one NFQUEUE queue (see the module's text)."""

    def __init__(self, queue: int = DEFAULT_QUEUE, *, dup: float = 0.0, reorder: float = 0.0,
                 drop: float = 0.0, delay_ms: float = 20.0, max_held: int = 32, seed: int = 0,
                 mark: int = MARK) -> None:
        if delay_ms <= 0 or max_held < 1:
            raise ValueError("delay_ms must be > 0 and max_held >= 1")
        self.queue = queue
        self.dup = _probability("dup", dup)
        self.reorder = _probability("reorder", reorder)
        self.drop = _probability("drop", drop)
        self.delay = delay_ms / 1000.0
        self.max_held = max_held
        self.rng = random.Random(seed)
        self.mark = mark
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        # held packets, oldest first: (deadline, packet, duplicate it, packets passed when held)
        self.held: deque[tuple[float, Any, bool, int]] = deque()
        self.closing = False
        self._raw: dict[int, socket.socket] = {}

    # ---- packets
    def _copy_socket(self, version: int) -> socket.socket:
        s = self._raw.get(version)
        if s is None:
            s = socket.socket(socket.AF_INET if version == 4 else socket.AF_INET6, socket.SOCK_RAW,
                              socket.IPPROTO_RAW)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            self._raw[version] = s
        return s

    def send_copy(self, data: bytes) -> None:
        """Send ``data`` (a whole IP packet) again, as is, through a raw socket."""
        version = data[0] >> 4 if data else 0
        try:
            if version == 4:
                dst = socket.inet_ntop(socket.AF_INET, data[16:20])
            elif version == 6:
                dst = socket.inet_ntop(socket.AF_INET6, data[24:40])
            else:
                raise OSError(f"not an IP packet (version {version})")
            self._copy_socket(version).sendto(data, (dst, 0))
        except OSError:
            self.counters["copy_errors"] += 1
            return
        self.counters["duplicated"] += 1

    def _pass(self, pkt: Any, dup: bool) -> None:
        data = pkt.get_payload() if dup else b""
        pkt.accept()
        self.counters["passed"] += 1
        if dup:
            self.send_copy(data)

    def on_packet(self, pkt: Any) -> None:
        if self.closing:
            pkt.accept()
            self.counters["passed"] += 1
            return
        now = time.monotonic()
        self.release(now)
        c = self.counters
        c["seen"] += 1
        r_drop, r_dup, r_hold = self.rng.random(), self.rng.random(), self.rng.random()
        if r_drop < self.drop:
            pkt.drop()
            c["dropped"] += 1
            return
        dup = r_dup < self.dup
        if r_hold < self.reorder:
            pkt.retain()  # keeps a copy of the payload: the verdict (and copy) come later
            if len(self.held) >= self.max_held:
                self._release_one()
            self.held.append((now + self.delay, pkt, dup, c["passed"]))
            c["held"] += 1
            return
        self._pass(pkt, dup)

    def _release_one(self) -> None:
        _, pkt, dup, passed = self.held.popleft()
        if self.counters["passed"] > passed:
            self.counters["reordered"] += 1
        self._pass(pkt, dup)

    def release(self, now: float) -> None:
        """Accept the held packets whose time is up."""
        while self.held and self.held[0][0] <= now:
            self._release_one()

    def release_all(self) -> None:
        while self.held:
            self._release_one()

    def next_timeout(self) -> float | None:
        return max(0.0, self.held[0][0] - time.monotonic()) if self.held else None

    def counters_line(self) -> str:
        return "ftpalg-faults: counters " + " ".join(f"{k}={v}" for k, v in self.counters.items())

    # ---- the loop
    def serve(self, ready: Callable[[], None] | None = None, before_unbind: Callable[[], None] | None = None) -> None:
        """Serve the queue until SIGTERM/SIGINT; ``ready()`` once bound; ``before_unbind()``
        after the held packets went, while queued ones are still accepted."""
        from netfilterqueue import NetfilterQueue

        from ..linux.nfqueue import queue_selector

        nfq = NetfilterQueue()
        nfq.bind(self.queue, self.on_packet, max_len=QUEUE_MAXLEN)
        try:
            with queue_selector(nfq) as (sel, stopped):
                try:
                    if ready:
                        ready()
                    while not stopped:
                        if sel.select(self.next_timeout()):
                            nfq.run(block=False)
                        self.release(time.monotonic())
                finally:
                    self.closing = True
                    self.release_all()
                    nfq.run(block=False)
                    if before_unbind:
                        before_unbind()
                    nfq.run(block=False)
        finally:
            for s_ in self._raw.values():
                s_.close()
            nfq.unbind()


# ---- the API for tests -----------------------------------------------------------------------------
class Faults:
    """Faults on one hook point of namespace ``ns`` for the life of a ``with`` block: the loss
    rule (``loss``) and, if ``dup``, ``reorder`` or ``drop`` is set, the shuffler on queue
    ``queue`` with its rule. Everything is removed on exit, also after an exception; the
    shuffler's final counters are then in ``counters``."""

    def __init__(self, ns: str, *, loss: float = 0.0, dup: float = 0.0, reorder: float = 0.0,
                 drop: float = 0.0, delay_ms: float = 20.0, max_held: int = 32, ports: Sequence[int] = (),
                 chain: str = "INPUT", table: str = "security", in_dev: str | None = None,
                 out_dev: str | None = None, families: Iterable[int] = (4,), queue: int = DEFAULT_QUEUE,
                 seed: int = 0, mark: int = MARK, log: Path | None = None, timeout: float = 10.0) -> None:
        self.ns = ns
        self.shuffle = any(p > 0 for p in (_probability("dup", dup), _probability("reorder", reorder),
                                            _probability("drop", drop)))
        self.rules = Rules(ns, chain, table=table, in_dev=in_dev, out_dev=out_dev, ports=ports, loss=loss,
                           queue=queue if self.shuffle else None, families=families, mark=mark)
        self.argv = [sys.executable, "-m", "ftpalg.lab.faults", "shuffle", "--queue", str(queue),
                     "--dup", repr(dup), "--reorder", repr(reorder), "--drop", repr(drop),
                     "--delay-ms", repr(delay_ms), "--max-held", str(max_held), "--seed", str(seed),
                     "--mark", hex(mark)]
        Shuffler(queue, dup=dup, reorder=reorder, drop=drop, delay_ms=delay_ms, max_held=max_held)  # validate
        self.log, self.timeout = log, timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.output: list[str] = []
        self._partial = b""
        self.counters: dict[str, int] = {}

    def __enter__(self) -> Faults:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        check_namespace(self.ns)
        try:
            if self.shuffle:
                self._start_shuffler()
            self.rules.install()
        except BaseException:
            self.stop()
            raise

    def _start_shuffler(self) -> None:
        self.proc = subprocess.Popen(_in_ns(self.ns, self.argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=Path(__file__).resolve().parents[2])
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            self.output += [line.decode(errors="replace") for line in lines]
            if any(line.startswith(READY) for line in self.output):
                self._partial = buf
                return
        self.output += [buf.decode(errors="replace")] if buf else []
        raise FaultError(f"shuffler in {self.ns} did not bind its queue: {' | '.join(self.output)}")

    def stop(self) -> dict[str, int]:
        """Remove the rules, stop the shuffler (held packets go), return its counters."""
        try:
            self.rules.remove()
        finally:
            self._stop_shuffler()
        return self.counters

    def _stop_shuffler(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        try:
            rest, _ = p.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            rest, _ = p.communicate()
        self.output += (self._partial + rest).decode(errors="replace").splitlines()
        self._partial = b""
        for line in self.output:
            m = COUNTERS_RE.match(line)
            if m:
                self.counters = {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
        if self.log:
            with open(self.log, "a") as f:
                f.write("".join(f"{line}\n" for line in self.output))


# ---- the command ---------------------------------------------------------------------------------
def _shuffle(a: argparse.Namespace) -> int:
    if in_host_namespace():
        print("ftpalg-faults: refusing to run in the host's network namespace (use ip netns exec)",
              file=sys.stderr)
        return 2
    shuffler = Shuffler(a.queue, dup=a.dup, reorder=a.reorder, drop=a.drop, delay_ms=a.delay_ms,
                        max_held=a.max_held, seed=a.seed, mark=a.mark)
    rules = None
    if a.chain:
        rules = Rules(None, a.chain, table=a.table, in_dev=a.in_dev, out_dev=a.out_dev, ports=a.port,
                      loss=a.loss, queue=a.queue, families=a.family, mark=a.mark)
    elif a.loss or a.port or a.in_dev or a.out_dev:
        print("ftpalg-faults: --loss, --port, --in-dev and --out-dev need --chain", file=sys.stderr)
        return 2

    def ready() -> None:
        if rules:
            rules.install()
        print(f"{READY} {a.queue}", flush=True)

    try:
        shuffler.serve(ready, rules.remove if rules else None)
    finally:
        if rules:
            rules.remove()
        print(shuffler.counters_line(), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ftpalg.lab.faults", description="Fault injection in a lab namespace.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("shuffle", help="drop, duplicate and reorder the packets of an NFQUEUE queue")
    s.add_argument("--queue", type=int, default=DEFAULT_QUEUE)
    s.add_argument("--dup", type=float, default=0.0, help="probability of a copy")
    s.add_argument("--reorder", type=float, default=0.0, help="probability of being held --delay-ms")
    s.add_argument("--drop", type=float, default=0.0, help="probability of a drop verdict (seeded)")
    s.add_argument("--delay-ms", type=float, default=20.0)
    s.add_argument("--max-held", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--mark", type=lambda v: int(v, 0), default=MARK)
    g = s.add_argument_group("rules (installed in this namespace, removed on exit)")
    g.add_argument("--chain", help="queue (and --loss) in this chain")
    g.add_argument("--table", default="security", choices=sorted(TABLES))
    g.add_argument("--in-dev")
    g.add_argument("--out-dev")
    g.add_argument("--port", type=int, action="append", default=[], help="TCP port, either side (repeat)")
    g.add_argument("--loss", type=float, default=0.0, help="probability of an iptables statistic DROP")
    g.add_argument("--family", type=int, action="append", choices=(4, 6), help="4 (default) and/or 6")
    a = ap.parse_args(argv)
    a.family = a.family or [4]
    return _shuffle(a)


if __name__ == "__main__":
    sys.exit(main())
