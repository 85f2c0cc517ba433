"""Firewall rules ftpalg needs, installed and removed through iptables-restore / nft.

Static rules (``ftpalg run`` installs them, ``--no-rules`` leaves them to the admin, who
loads the equivalent files in deploy/):
- queue: control-port packets of both directions go to NFQUEUE at raw PREROUTING, i.e.
  before conntrack and NAT (see README "Where ftpalg sits"). nft's ``queue`` statement is
  used where the kernel has it, else iptables' NFQUEUE target. ``bypass``: while no ftpalg
  process is bound, packets pass unchanged (fail-open).
- pinhole chains: ``nat FTPALG-PINHOLES`` (jumped to from PREROUTING: DNAT) and
  ``filter FTPALG-PINHOLES`` (jumped to from FORWARD, before the admin's rules: ACCEPT).

Pinholes are two rules each, added and removed in one iptables-restore transaction. Every
value written into a rule is an int or an address re-formatted by ``ipaddress``; no text
from packets reaches a command line, and no shell is ever involved.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import subprocess
import threading
import time
from collections.abc import Iterable

from ..core.table import Pinhole

log = logging.getLogger("ftpalg")

CHAIN_QUEUE = "FTPALG-QUEUE"
CHAIN_PINHOLES = "FTPALG-PINHOLES"
NFT_TABLE = "ftpalg"
DEFAULT_QUEUE = 2121


class RuleError(RuntimeError):
    pass


def _run(argv: list[str], stdin: str | None = None) -> None:
    try:
        p = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuleError(f"{argv[0]}: {e}") from e
    if p.returncode != 0:
        raise RuleError(f"{' '.join(argv)}: {p.stderr.strip() or p.stdout.strip()}")


def _quiet(argv: list[str]) -> bool:
    """Run a clean-up command whose failure (e.g. the rule is already gone) is expected."""
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _restore(text: str) -> None:
    _run(["iptables-restore", "--noflush", "--wait"], text)


def _ip(a: str) -> str:
    return str(ipaddress.IPv4Address(a))


# ---- queue rules ------------------------------------------------------------------------
def iptables_queue_rules(ports: Iterable[int], queue: int) -> str:
    lines = ["*raw", f":{CHAIN_QUEUE} - [0:0]", f"-I PREROUTING 1 -j {CHAIN_QUEUE}"]
    for p in sorted(set(ports)):
        for match in ("--dport", "--sport"):
            lines.append(
                f"-A {CHAIN_QUEUE} -p tcp {match} {int(p)} -j NFQUEUE --queue-num {int(queue)} --queue-bypass"
            )
    return "\n".join(lines + ["COMMIT", ""])


def nft_queue_rules(ports: Iterable[int], queue: int) -> str:
    ps = ", ".join(str(int(p)) for p in sorted(set(ports)))
    return (
        f"table ip {NFT_TABLE} {{\n"
        "\tchain prerouting {\n"
        "\t\ttype filter hook prerouting priority raw; policy accept;\n"
        f"\t\ttcp dport {{ {ps} }} queue flags bypass to {int(queue)}\n"
        f"\t\ttcp sport {{ {ps} }} queue flags bypass to {int(queue)}\n"
        "\t}\n"
        "}\n"
    )


def pinhole_chain_rules() -> str:
    return "\n".join([
        "*nat", f":{CHAIN_PINHOLES} - [0:0]", f"-I PREROUTING 1 -j {CHAIN_PINHOLES}", "COMMIT",
        "*filter", f":{CHAIN_PINHOLES} - [0:0]", f"-I FORWARD 1 -j {CHAIN_PINHOLES}", "COMMIT", "",
    ])


def _pinhole_specs(ph: Pinhole) -> tuple[str, str]:
    """The nat and filter rule specifications of ``ph`` (without command and chain)."""
    peer, public, inside = _ip(ph.peer), _ip(ph.public), _ip(ph.inside)
    pp, ip_ = int(ph.public_port), int(ph.inside_port)
    tag = f'-m comment --comment "ftpalg pinhole {int(ph.id)}"'
    # --syn + limit 1/day, burst 1: the rule matches one SYN; the nat table only sees a
    # connection's first packet, so the pinhole DNATs exactly one connection (one-shot, like
    # a kernel expectation), and a stray non-SYN packet cannot use it up. Later connections
    # to the port are not DNATed, hence not accepted by the filter rule either.
    return (
        f"-s {peer}/32 -d {public}/32 -p tcp -m tcp --dport {pp} --syn -m limit --limit 1/day --limit-burst 1 {tag}"
        f" -j DNAT --to-destination {inside}:{ip_}",
        f"-s {peer}/32 -d {inside}/32 -p tcp -m tcp --dport {ip_}"
        f" -m conntrack --ctstate DNAT --ctorigdst {public} --ctorigdstport {pp} {tag} -j ACCEPT",
    )


def pinhole_rules(phs: Pinhole | list[Pinhole], op: str) -> str:
    """iptables-restore text adding (op '-I': first in the chain, so the newest pinhole for
    a server/port wins over one still waiting for removal) or deleting (op '-D') the rules
    of one or more pinholes, in one transaction."""
    items = phs if isinstance(phs, list) else [phs]
    cmd = f"-I {CHAIN_PINHOLES} 1" if op == "-I" else f"-D {CHAIN_PINHOLES}"
    specs = [_pinhole_specs(ph) for ph in items]
    return "\n".join([
        "*nat", *(f"{cmd} {n}" for n, _ in specs), "COMMIT",
        "*filter", *(f"{cmd} {f}" for _, f in specs), "COMMIT", "",
    ])


class IptablesPinholes:
    """Pinhole backend on iptables-restore.

    ``open`` is synchronous: the rules must exist before the PORT/EPRT reaches the server
    (pyftpdlib connects as soon as it reads PORT). ``close`` is handed to a worker thread
    that removes pending pinholes in one transaction at most every ``close_delay`` seconds:
    a deletion in nf_tables costs ~16 ms here (iptables -D and nft element deletes alike)
    and stalls every other rule change meanwhile, so deleting one by one would stall each
    next session's PORT (measured: median +16 ms per open). A closed pinhole therefore
    stays in the kernel up to ``close_delay`` longer; a new pinhole for the same server and
    public port is inserted first in the chain and wins over it."""

    def __init__(self, close_delay: float = 1.0) -> None:
        self.close_delay = close_delay
        self._pending: queue.SimpleQueue[Pinhole | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._worker, name="ftpalg-pinhole-close", daemon=True)
        self._thread.start()
        self.close_failures = 0

    def open(self, ph: Pinhole) -> None:
        _restore(pinhole_rules(ph, "-I"))

    def close(self, ph: Pinhole) -> None:
        self._pending.put(ph)

    def _worker(self) -> None:
        stop = False
        while not stop:
            item = self._pending.get()
            deadline = time.monotonic() + self.close_delay
            batch: list[Pinhole] = []
            while True:
                if item is None:
                    stop = True
                    deadline = 0.0  # flush what we have, now
                else:
                    batch.append(item)
                try:
                    item = self._pending.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            if batch:
                self._delete(batch)

    def _delete(self, batch: list[Pinhole]) -> None:
        try:
            _restore(pinhole_rules(batch, "-D"))
            return
        except RuleError:
            pass  # one rule already gone fails the whole transaction: go one by one
        for ph in batch:
            try:
                _restore(pinhole_rules(ph, "-D"))
            except RuleError as e:
                self.close_failures += 1
                log.warning("pinhole_close_failed id=%d: %s", ph.id, e)

    def shutdown(self) -> None:
        """Finish pending removals and stop the worker."""
        self._pending.put(None)
        self._thread.join(30)


def nft_queue_available() -> bool:
    """Whether this kernel runs nft's queue statement: try it in a scratch table."""
    probe = nft_queue_rules([9], 0).replace(f"table ip {NFT_TABLE} ", "table ip ftpalg_probe ")
    try:
        _run(["nft", "-f", "-"], probe)
    except RuleError:
        return False
    finally:
        _quiet(["nft", "delete", "table", "ip", "ftpalg_probe"])
    return True


def pinhole_chains_present() -> bool:
    """Whether the pinhole chains exist (what ``--no-rules`` expects the admin to load)."""
    return all(_quiet(["iptables", "-w", "-t", t, "-S", CHAIN_PINHOLES]) for t in ("nat", "filter"))


class StaticRules:
    """The queue rule and the pinhole chains, installed by ``ftpalg run``."""

    def __init__(self, ports: Iterable[int], queue: int, backend: str = "auto") -> None:
        self.ports = sorted(set(ports))
        self.queue = queue
        self.backend = backend
        self.installed = False

    def install(self) -> str:
        """Install all static rules (removing stale ones first); return the queue backend."""
        self.remove()
        if self.backend == "auto":
            self.backend = "nft" if nft_queue_available() else "iptables"
        self.installed = True
        _restore(pinhole_chain_rules())
        if self.backend == "nft":
            _run(["nft", "-f", "-"], nft_queue_rules(self.ports, self.queue))
        else:
            _restore(iptables_queue_rules(self.ports, self.queue))
        return self.backend

    def remove(self) -> None:
        """Remove every rule and chain ftpalg may have installed; missing ones are fine."""
        for table, hook, chain in (
            ("raw", "PREROUTING", CHAIN_QUEUE),
            ("nat", "PREROUTING", CHAIN_PINHOLES),
            ("filter", "FORWARD", CHAIN_PINHOLES),
        ):
            for _ in range(16):  # a jump may have been inserted more than once
                if not _quiet(["iptables", "-w", "-t", table, "-D", hook, "-j", chain]):
                    break
            _quiet(["iptables", "-w", "-t", table, "-F", chain])
            _quiet(["iptables", "-w", "-t", table, "-X", chain])
        _quiet(["nft", "delete", "table", "ip", NFT_TABLE])
        self.installed = False
