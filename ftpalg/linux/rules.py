"""Firewall rules ftpalg needs, installed and removed through iptables-restore /
ip6tables-restore / nft.

Static rules (``ftpalg run`` installs them for IPv4 and IPv6, ``--no-rules`` leaves them to the
admin, who loads the equivalent files in deploy/):
- queue: control-port packets of both directions go to NFQUEUE at raw PREROUTING, i.e.
  before conntrack and NAT (see README "Where ftpalg sits"). nft's ``queue`` statement is
  used where the kernel has it, else iptables' NFQUEUE target. ``bypass``: while no ftpalg
  process is bound, packets pass unchanged (fail-open).
- pinhole chains, jumped to first from their hooks: ``nat FTPALG-PINHOLES`` (PREROUTING:
  admit one connection, DNAT), ``nat FTPALG-SNAT`` (POSTROUTING: SNAT) and ``filter
  FTPALG-PINHOLES`` (FORWARD, before the admin's rules: ACCEPT).

A pinhole is up to four rules added and removed in one transaction. The first one admits
exactly one connection: it matches a SYN from the peer to the public address and port, in
the nat table, which sees only a connection's first packet, with ``limit 1/day burst 1``,
and sets the conntrack mark bit ``PINHOLE_MARK`` on it. Only a connection carrying that bit
is DNATed, SNATed and accepted by the other rules, so a second connection to the same port
gets nothing, whether or not the pinhole translates addresses (an IPv6 gateway without NAT
only accepts). Every value written into a rule is an int or an address re-formatted by
``ipaddress``; no text from packets reaches a command line, and no shell is ever involved.
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
CHAIN_SNAT = "FTPALG-SNAT"
NFT_TABLE = "ftpalg"
DEFAULT_QUEUE = 2121
PINHOLE_MARK = 0x01000000  # conntrack mark bit of connections admitted by a pinhole
FAMILIES = (4, 6)
# (table, hook chain, our chain) of every jump ftpalg inserts
JUMPS = (
    ("raw", "PREROUTING", CHAIN_QUEUE),
    ("nat", "PREROUTING", CHAIN_PINHOLES),
    ("nat", "POSTROUTING", CHAIN_SNAT),
    ("filter", "FORWARD", CHAIN_PINHOLES),
)


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


def iptables(family: int) -> str:
    return "iptables" if family == 4 else "ip6tables"


def _restore(text: str, family: int = 4) -> None:
    _run([f"{iptables(family)}-restore", "--noflush", "--wait"], text)


def _ip(a: str, family: int) -> str:
    return str(ipaddress.IPv4Address(a) if family == 4 else ipaddress.IPv6Address(a))


def _net(a: str, family: int) -> str:
    return f"{_ip(a, family)}/{32 if family == 4 else 128}"


def _to(a: str, port: int, family: int) -> str:
    return f"{_ip(a, family)}:{int(port)}" if family == 4 else f"[{_ip(a, family)}]:{int(port)}"


# ---- queue rules ------------------------------------------------------------------------
def iptables_queue_rules(ports: Iterable[int], queue: int) -> str:
    """The queue rule, in iptables-restore and ip6tables-restore format alike."""
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
        f"table inet {NFT_TABLE} {{\n"
        "\tchain prerouting {\n"
        "\t\ttype filter hook prerouting priority raw; policy accept;\n"
        f"\t\ttcp dport {{ {ps} }} queue flags bypass to {int(queue)}\n"
        f"\t\ttcp sport {{ {ps} }} queue flags bypass to {int(queue)}\n"
        "\t}\n"
        "}\n"
    )


def pinhole_chain_rules() -> str:
    """The pinhole chains and their jumps, in iptables-restore and ip6tables-restore format."""
    return "\n".join([
        "*nat", f":{CHAIN_PINHOLES} - [0:0]", f":{CHAIN_SNAT} - [0:0]",
        f"-I PREROUTING 1 -j {CHAIN_PINHOLES}", f"-I POSTROUTING 1 -j {CHAIN_SNAT}", "COMMIT",
        "*filter", f":{CHAIN_PINHOLES} - [0:0]", f"-I FORWARD 1 -j {CHAIN_PINHOLES}", "COMMIT", "",
    ])


def _pinhole_specs(ph: Pinhole) -> tuple[list[str], list[str], list[str]]:
    """The nat PREROUTING, nat POSTROUTING and filter rule specifications of ``ph``
    (without command and chain)."""
    f = ph.family
    peer, public, inside = _net(ph.peer, f), _net(ph.public, f), _net(ph.inside, f)
    pp, ip_ = int(ph.public_port), int(ph.inside_port)
    tag = f'-m comment --comment "ftpalg pinhole {int(ph.id)}"'
    mark = f"-m connmark --mark {PINHOLE_MARK:#x}/{PINHOLE_MARK:#x}"
    orig = f"-m conntrack --ctorigsrc {peer} --ctorigdst {public} --ctorigdstport {pp}"
    # One SYN, once: the nat table sees only a connection's first packet, so this admits
    # exactly one connection (one-shot, like a kernel expectation); a stray non-SYN
    # packet cannot use it up.
    pre = [f"-s {peer} -d {public} -p tcp -m tcp --dport {pp} --syn -m limit --limit 1/day --limit-burst 1 {tag}"
           f" -j CONNMARK --or-mark {PINHOLE_MARK:#x}"]
    if ph.dnat:
        pre.append(f"-s {peer} -d {public} -p tcp -m tcp --dport {pp} {mark} {tag}"
                   f" -j DNAT --to-destination {_to(ph.inside, ip_, f)}")
    post = []
    if ph.snat is not None:
        post.append(f"-s {peer} -d {inside} -p tcp -m tcp --dport {ip_} {mark} {orig} {tag}"
                    f" -j SNAT --to-source {_ip(ph.snat, f)}")
    filt = [f"-s {peer} -d {inside} -p tcp -m tcp --dport {ip_} {mark} -m conntrack --ctstate NEW"
            f" --ctorigsrc {peer} --ctorigdst {public} --ctorigdstport {pp} {tag} -j ACCEPT"]
    return pre, post, filt


def pinhole_rules(phs: Pinhole | list[Pinhole], op: str) -> str:
    """iptables-restore text adding (op '-I': first in the chain, so the newest pinhole for
    a peer/port wins over one still waiting for removal) or deleting (op '-D') the rules
    of one or more pinholes of one family, in one transaction."""
    items = phs if isinstance(phs, list) else [phs]

    def cmd(chain: str) -> str:
        return f"-I {chain} 1" if op == "-I" else f"-D {chain}"

    nat: list[str] = []
    filt: list[str] = []
    for ph in items:
        pre, post, acc = _pinhole_specs(ph)
        # inserted at the top one by one: insert in reverse so they end up in order
        pre = pre[::-1] if op == "-I" else pre
        nat += [f"{cmd(CHAIN_PINHOLES)} {r}" for r in pre] + [f"{cmd(CHAIN_SNAT)} {r}" for r in post]
        filt += [f"{cmd(CHAIN_PINHOLES)} {r}" for r in acc]
    return "\n".join(["*nat", *nat, "COMMIT", "*filter", *filt, "COMMIT", ""])


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
        _restore(pinhole_rules(ph, "-I"), ph.family)

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
        for family in FAMILIES:
            some = [ph for ph in batch if ph.family == family]
            if not some:
                continue
            try:
                _restore(pinhole_rules(some, "-D"), family)
                continue
            except RuleError:
                pass  # one rule already gone fails the whole transaction: go one by one
            for ph in some:
                try:
                    _restore(pinhole_rules(ph, "-D"), family)
                except RuleError as e:
                    self.close_failures += 1
                    log.warning("pinhole_close_failed id=%d: %s", ph.id, e)

    def shutdown(self) -> None:
        """Finish pending removals and stop the worker."""
        self._pending.put(None)
        self._thread.join(30)


def nft_queue_available() -> bool:
    """Whether this kernel runs nft's queue statement: try it in a scratch table."""
    probe = nft_queue_rules([9], 0).replace(f"table inet {NFT_TABLE} ", "table inet ftpalg_probe ")
    try:
        _run(["nft", "-f", "-"], probe)
    except RuleError:
        return False
    finally:
        _quiet(["nft", "delete", "table", "inet", "ftpalg_probe"])
    return True


def pinhole_chains_present() -> bool:
    """Whether the pinhole chains exist, IPv4 and IPv6 (what ``--no-rules`` expects the
    admin to load)."""
    return all(_quiet([iptables(f), "-w", "-t", t, "-S", c])
               for f in FAMILIES for t, _, c in JUMPS if c != CHAIN_QUEUE)


class StaticRules:
    """The queue rule and the pinhole chains, IPv4 and IPv6, installed by ``ftpalg run``."""

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
        for f in FAMILIES:
            _restore(pinhole_chain_rules(), f)
        if self.backend == "nft":
            _run(["nft", "-f", "-"], nft_queue_rules(self.ports, self.queue))
        else:
            for f in FAMILIES:
                _restore(iptables_queue_rules(self.ports, self.queue), f)
        return self.backend

    def remove(self) -> None:
        """Remove every rule and chain ftpalg may have installed; missing ones are fine."""
        for f in FAMILIES:
            ipt = iptables(f)
            for table, hook, chain in JUMPS:
                for _ in range(16):  # a jump may have been inserted more than once
                    if not _quiet([ipt, "-w", "-t", table, "-D", hook, "-j", chain]):
                        break
                _quiet([ipt, "-w", "-t", table, "-F", chain])
                _quiet([ipt, "-w", "-t", table, "-X", chain])
        _quiet(["nft", "delete", "table", "inet", NFT_TABLE])
        self.installed = False
