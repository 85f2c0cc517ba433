"""The kernel features ``ftpalg run`` needs, tried for real in two scratch network namespaces
of the doctor's own, ``<prefix><pid>-c`` (a client) and ``<prefix><pid>-g`` (a gateway),
joined by a veth (192.0.2.1 -- 192.0.2.2, TEST-NET-1), created by ``ip netns add`` and always
deleted again (also after Ctrl-C/SIGTERM; a doctor killed outright leaves them to the next
doctor, which deletes those whose pid is gone). Nothing is added to the namespace the doctor
is run in; kernel modules the trials need are loaded, as ``ftpalg run`` would load them.

In the gateway namespace, in this order:

1. each iptables match and target of ftpalg's queue rule on its own, IPv4 and IPv6 (a missing
   one is named with its module); nft's features on their own (the carrier helper ``sane``,
   conntrack labels, nat chains); nft's ``queue`` statement;
2. ftpalg's rules exactly as ``ftpalg run`` installs them for this configuration
   (``StaticRules.install``);
3. a TCP connection from the client to the first control port, DNATed to another address of
   the gateway (as to a server behind it), every worker's queue bound:
   a lower-case ``pasv`` line must reach the queue (the selection's ``string --icase``; all
   segments with ``queue = all``), with several workers the queue of the worker the
   connection's labels name (from a client port of the last worker's: worker 0's queue is
   also where unlabelled connections go); a ``NOOP`` line must stay in the kernel (selected); a segment
   without line end must reach it (``bpf``); a ``NOOP`` of a connection marked with the
   follow label set over ctnetlink must reach it (``connlabel``);
4. over ctnetlink: the connection's entry, its helper (``sane``), an expectation created and
   deleted (and the kernel's event of its removal), a sequence correction kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import select
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from .checks import FAIL, INFO, OK, WARN, Check
from .ctnetlink import CtError, CtNetlink, ExpectationEvents, NoSeqAdjust
from .rules import (
    ALIVE_MARK,
    FOLLOW_LABEL,
    HELPER,
    NO_LINE_END_BPF,
    SYN_RATE,
    RuleError,
    StaticRules,
    _buckets,
    _quiet,
    _run,
    iptables,
)
from .stop import signals_held

CLONE_NEWNET = 0x40000000
CLIENT, GATEWAY, SERVER = "192.0.2.1", "192.0.2.2", "192.0.2.3"  # SERVER: on the gateway, DNATed to
WAIT = 2.0  # seconds a trial segment may take to arrive


# ---- scratch namespaces ---------------------------------------------------------------------------
def _ip(*args: str, check: bool = True) -> None:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {p.stderr.strip()}")


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def stale(prefix: str, names: list[str]) -> list[str]:
    """Scratch namespaces of doctors that are gone (killed before they could remove them)."""
    out = []
    for n in names:
        m = re.fullmatch(rf"{re.escape(prefix)}(\d+)-[cg]", n)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            out.append(n)
    return out


class Scratch:
    """The doctor's two namespaces; ``inside(name)`` runs the block (and the processes and
    sockets it creates) in one of them."""

    def __init__(self, prefix: str) -> None:
        self.client = f"{prefix}{os.getpid()}-c"
        self.gateway = f"{prefix}{os.getpid()}-g"
        self.prefix = prefix

    def up(self) -> None:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        for n in stale(self.prefix, listed):
            _ip("netns", "del", n, check=False)
        try:
            _ip("netns", "add", self.client)
            _ip("netns", "add", self.gateway)
            _ip("link", "add", "c0", "netns", self.client, "type", "veth", "peer", "name", "g0", "netns", self.gateway)
            for ns, dev, addrs in ((self.client, "c0", [CLIENT]), (self.gateway, "g0", [GATEWAY, SERVER])):
                for addr in addrs:
                    _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        with signals_held():  # a second Ctrl-C does not leave them behind
            for n in (self.client, self.gateway):
                _ip("netns", "del", n, check=False)

    @contextlib.contextmanager
    def inside(self, name: str) -> Iterator[None]:
        here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        there = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(there)
            try:
                yield
            finally:
                _setns(here)
        finally:
            os.close(there)
            os.close(here)


# ---- 1. features one by one ---------------------------------------------------------------------
@dataclass(frozen=True)
class Feature:
    name: str
    rule: str  # after "-A CHAIN"; {u32} is the family's first-header test
    what: str  # what ftpalg uses it for
    modules: str
    needed: Callable[[Config], bool]


def _iptables_queue(cfg: Config) -> bool:
    return cfg.gateway.queue_backend != "nft"


FEATURES = (
    Feature("nfqueue", "-j NFQUEUE --queue-num 7 --queue-bypass", "the queue rule", "xt_NFQUEUE, nfnetlink_queue",
            _iptables_queue),
    Feature("conntrack", "-p tcp -m conntrack --ctorigdstport 21 --ctdir ORIGINAL -j RETURN",
            "control connections by their original port and direction", "xt_conntrack", _iptables_queue),
    Feature("rpfilter", "-m rpfilter --invert -j RETURN", "forged sources are never read", "xt_rpfilter, ip6t_rpfilter",
            _iptables_queue),
    Feature("u32", '-m u32 --u32 "{u32}" -j RETURN', "only segments with payload", "xt_u32", _iptables_queue),
    Feature("mark", f"-m mark --mark {ALIVE_MARK:#x}/{ALIVE_MARK:#x} -j RETURN",
            "no bypass while ftpalg restarts", "xt_mark", _iptables_queue),
    Feature("string", '-m string --algo bm --icase --string "PASV" -j RETURN',
            "queue = selected: verbs anywhere in a segment, any case", "xt_string, ts_bm",
            lambda c: _iptables_queue(c) and c.queue_selected),
    Feature("bpf", f'-m bpf --bytecode "{NO_LINE_END_BPF}" -j RETURN',
            "queue = selected: segments without line end", "xt_bpf",
            lambda c: _iptables_queue(c) and c.queue_selected),
    Feature("connlabel", f"-m connlabel --label {FOLLOW_LABEL} -j RETURN",
            "queue = selected (followed connections) and workers > 1", "xt_connlabel",
            lambda c: _iptables_queue(c) and (c.queue_selected or c.gateway.workers > 1)),
    Feature("limit", f"-p tcp --syn -m limit --limit {SYN_RATE}/s --limit-burst {SYN_RATE} -j RETURN",
            "queue = all: SYNs and RSTs up to a rate", "xt_limit",
            lambda c: _iptables_queue(c) and not c.queue_selected),
)
U32 = {4: "0>>22&0x3C=20", 6: "4>>8&0xFF=6"}


def _first_line(e: Exception) -> str:
    """The line of a tool's error that says what is wrong (nft: "Error: ...", not the
    echoed rule or its carets)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    said = [ln[ln.index("Error:") + 7:] for ln in lines if "Error:" in ln]
    return (said[0] if said else lines[0] if lines else type(e).__name__).split("; did you mean")[0]


def feature_checks(cfg: Config) -> list[Check]:
    out = []
    for f in FEATURES:
        failed = []
        for fam in (4, 6):
            chain = f"FDOC-{f.name.upper()}"
            text = f"*mangle\n:{chain} - [0:0]\n-A {chain} {f.rule.format(u32=U32[fam])}\nCOMMIT\n"
            try:
                _run([f"{iptables(fam)}-restore", "--noflush", "--wait"], text)
            except RuleError as e:
                failed.append(f"IPv{fam}: {_first_line(e)}")
        name = f"iptables-{f.name}"
        if not failed:
            out.append(Check(name, OK, f"loads, IPv4 and IPv6 ({f.what})"))
        elif f.needed(cfg):
            out.append(Check(name, FAIL, f"does not load ({'; '.join(failed)}); needed for {f.what}",
                             f"a kernel with {f.modules} (modprobe them; CONFIG_NETFILTER_XT_*)"))
        else:
            out.append(Check(name, INFO, f"does not load ({'; '.join(failed)}); this configuration does not "
                                         f"need it ({f.what})"))
    return out


NFT_FEATURES = (
    ("nft-helper", f'ct helper h {{\n\t\ttype "{HELPER}" protocol tcp\n\t\tl3proto inet\n\t}}\n'
                   "\tchain c {\n\t\ttype filter hook prerouting priority -175; policy accept;\n"
                   '\t\ttcp dport 21 ct state new ct helper set "h"\n\t}',
     f"the carrier helper {HELPER}: a control connection may carry expectations and, if NATed, corrections",
     "nf_conntrack_sane, nft_ct", lambda c: True),
    ("nft-labels", "chain c {\n\t\ttype filter hook prerouting priority -175; policy accept;\n"
                   "\t\ttcp dport 21 ct state new ct label set 120\n\t}",
     "workers > 1: each control connection's worker", "nft_ct (conntrack labels)",
     lambda c: c.gateway.workers > 1),
    ("nft-nat", "chain n {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t}",
     "the nat chains of ftpalg's table", "nft_chain_nat",
     lambda c: True),
)


def _load_and_delete(text: str, table: str) -> None:
    """Load an nft trial table, then delete it: it must not act on the trial connection
    below (a label or helper of its own would change what ftpalg's rules do)."""
    try:
        _run(["nft", "-f", "-"], text)
    finally:
        _quiet(["nft", "delete", "table", "inet", table])


def nft_checks(cfg: Config) -> list[Check]:
    out = []
    for name, body, what, modules, needed in NFT_FEATURES:
        table = f"fdoc_{name[4:]}"
        try:
            _load_and_delete(f"table inet {table} {{\n\t{body}\n}}\n", table)
        except RuleError as e:
            if needed(cfg):
                out.append(Check(name, FAIL, f"does not load ({_first_line(e)}); needed: {what}",
                                 f"a kernel with {modules}"))
            else:
                out.append(Check(name, INFO, f"does not load ({_first_line(e)}); not needed here: {what}"))
            continue
        out.append(Check(name, OK, f"loads ({what})"))
    return out


def nft_queue_check(cfg: Config) -> Check:
    probe = "table inet fdoc_queue {\n\tchain c {\n\t\ttype filter hook prerouting priority 0;\n" \
            "\t\ttcp dport 21 queue flags bypass to 7\n\t}\n}\n"
    try:
        _load_and_delete(probe, "fdoc_queue")
    except RuleError as e:
        if cfg.gateway.queue_backend == "nft":
            return Check("nft-queue", FAIL, f"nft's queue statement does not load ({_first_line(e)}), and "
                                            "queue_backend = nft", "queue_backend = auto (iptables' NFQUEUE)")
        return Check("nft-queue", INFO, f"nft's queue statement is not available ({_first_line(e)}); not "
                                        "needed: ftpalg queues with iptables' NFQUEUE (queue_backend = auto)")
    if cfg.gateway.queue_backend == "nft":
        return Check("nft-queue", OK, "nft's queue statement loads (queue_backend = nft: tried with traffic below)")
    return Check("nft-queue", INFO, "nft's queue statement loads; ftpalg queues with iptables' NFQUEUE "
                                    "(queue_backend = auto)")


# ---- 3. and 4.: a control connection through the rules ------------------------------------------------
@dataclass
class TrialConnection:
    """The trial connection: the queues bound (queue number -> NetfilterQueue), what reached
    each (queue number, TCP payload), the client's and the server's socket."""

    queues: dict[int, Any] = field(default_factory=dict)
    seen: list[tuple[int, bytes]] = field(default_factory=list)
    client: socket.socket | None = None
    server: socket.socket | None = None

    def bind(self, first: int, count: int) -> None:
        from netfilterqueue import NetfilterQueue

        for q in range(first, first + count):
            nfq = NetfilterQueue()
            nfq.bind(q, functools.partial(self._on_packet, q))
            self.queues[q] = nfq

    def _on_packet(self, q: int, pkt: Any) -> None:
        b = pkt.get_payload()
        ihl = (b[0] & 15) * 4
        self.seen.append((q, b[ihl + (b[ihl + 12] >> 4) * 4:]))
        pkt.accept()

    def pump(self, done: Callable[[], bool], timeout: float = WAIT) -> bool:
        """Serve the queues until ``done()`` or ``timeout`` seconds."""
        socks = {socket.fromfd(nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW): nfq for nfq in self.queues.values()}
        try:
            end = time.monotonic() + timeout
            while not done():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                for s in select.select(list(socks), [], [], min(left, 0.05))[0]:
                    socks[s].run(block=False)
            return True
        finally:
            for s in socks:
                s.close()

    def send(self, data: bytes) -> list[tuple[int, bytes]]:
        """Send ``data`` from the client; serve the queues until the server has it all; what
        reached a queue meanwhile (raises TimeoutError if the server never got it)."""
        assert self.client is not None and self.server is not None
        before = len(self.seen)
        self.client.sendall(data)
        got = b""

        def arrived() -> bool:
            nonlocal got
            with contextlib.suppress(BlockingIOError):
                got += self.server.recv(4096) if self.server else b""
            return len(got) >= len(data)

        if not self.pump(arrived):
            raise TimeoutError(f"{data!r} did not reach the server in {WAIT:g} s")
        return self.seen[before:]

    def close(self) -> None:
        for s in (self.client, self.server):
            if s is not None:
                s.close()
        for nfq in self.queues.values():
            with contextlib.suppress(Exception):
                nfq.unbind()


def _worker_of(sport: int, workers: int) -> int:
    return ((sport >> 1) & (_buckets(workers) - 1)) % workers if workers > 1 else 0


def traffic_checks(cfg: Config, scratch: Scratch) -> list[Check]:
    gw = cfg.gateway
    port = min(cfg.control_ports)
    out: list[Check] = []
    path = TrialConnection()
    nl = CtNetlink()
    events = ExpectationEvents() if cfg.queue_selected else None
    try:
        path.bind(gw.queue_num, gw.workers)
        # as on a gateway forwarding the control port to a server: the kernel gives a
        # connection with a helper its sequence-adjustment extension only when NAT changes
        # its tuple (an empty nat chain's null binding does not)
        _run(["nft", "-f", "-"], "table ip fdoc_dnat {\n\tchain p {\n\t\ttype nat hook prerouting priority dstnat;\n"
             f"\t\tip daddr {GATEWAY} tcp dport {port} dnat to {SERVER}\n\t}}\n}}\n")
        lst = socket.socket()
        lst.bind((SERVER, port))
        lst.listen()
        with scratch.inside(scratch.client):
            cl = socket.socket()
        if gw.workers > 1:  # from a port the last worker's labels name (worker 0 needs no label)
            cl.bind((CLIENT, next(p for p in range(40000, 65536, 2) if _worker_of(p, gw.workers) == gw.workers - 1)))
        cl.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            cl.connect((GATEWAY, port))
        lst.setblocking(False)
        conn: list[socket.socket] = []

        def accepted() -> bool:
            with contextlib.suppress(BlockingIOError):
                conn.append(lst.accept()[0])
            return bool(conn)

        ok = path.pump(accepted)
        lst.close()
        if not ok:
            cl.close()
            return [Check("queue-path", FAIL, f"no TCP connection to control port {port} through ftpalg's rules")]
        path.client, path.server = cl, conn[0]
        path.server.setblocking(False)
        sport = cl.getsockname()[1]
        want = gw.queue_num + _worker_of(sport, gw.workers)
        key = (socket.inet_aton(CLIENT), sport, socket.inet_aton(GATEWAY), port)
        out += _queue_checks(cfg, path, want, port)
        out += _netlink_checks(cfg, path, nl, events, key, want)
    except (OSError, TimeoutError) as e:
        out.append(Check("queue-path", FAIL, f"trial connection: {_first_line(e)}"))
    finally:
        path.close()
        nl.close()
        if events is not None:
            events.close()
    return out


def _queue_checks(cfg: Config, path: TrialConnection, want: int, port: int) -> list[Check]:
    gw = cfg.gateway
    out = []
    got = path.send(b"pasv\r\n")
    where = f"queue {want}" + (f" (the worker its conntrack labels name, of {gw.workers})" if gw.workers > 1 else "")
    queued = [q for q, data in got if data.startswith(b"pasv")]
    if not queued:
        out.append(Check("queue-path", FAIL, f"a 'pasv' line to port {port} passed without reaching any queue",
                         "see the iptables-* checks above; iptables-save -t mangle shows the FTPALG-* chains"))
    elif queued != [want]:
        out.append(Check("queue-path", FAIL, f"a 'pasv' line reached queue {queued[0]}, not {where}",
                         "see the nft-labels and iptables-connlabel checks"))
    else:
        how = "selected by string --icase" if cfg.queue_selected else "queue = all"
        out.append(Check("queue-path", OK, f"a 'pasv' line to control port {port} reached {where} ({how})"))
    if not cfg.queue_selected:
        return out
    got = path.send(b"NOOP\r\n")
    stray = [q for q, data in got if data]
    partial = path.send(b"NOOP")
    path.send(b"\r\n")
    problems = []
    if stray:
        problems.append("a 'NOOP' line was queued too (every segment will leave the kernel)")
    if not any(data == b"NOOP" for _, data in partial):
        problems.append("a segment without line end stayed in the kernel (bpf)")
    if problems:
        out.append(Check("selection", FAIL, "; ".join(problems), "see the iptables-bpf and iptables-u32 checks"))
    else:
        out.append(Check("selection", OK, "a 'NOOP' line stayed in the kernel; a segment without line end was "
                                          "queued (bpf)"))
    return out


def _netlink_checks(cfg: Config, path: TrialConnection, nl: CtNetlink, events: ExpectationEvents | None,
                    key: tuple[bytes, int, bytes, int], want: int) -> list[Check]:
    out = []
    entry = nl.get(key)
    if entry is None:
        return [Check("conntrack-netlink", FAIL, "the trial connection's entry was not found over ctnetlink",
                      "a kernel with nf_conntrack_netlink")]
    out.append(Check("conntrack-netlink", OK, "the trial connection's entry read over ctnetlink"))
    if entry.helper != HELPER:
        out.append(Check("carrier-helper", FAIL, f"the connection carries helper {entry.helper!r}, not {HELPER!r}",
                         "see nft-helper above"))
    else:
        out.append(Check("carrier-helper", OK, f"the connection carries the {HELPER} helper"))
    if cfg.queue_selected:
        try:
            nl.label(key, FOLLOW_LABEL, True)
            got = path.send(b"NOOP\r\n")
            nl.label(key, FOLLOW_LABEL, False)
            if any(q == want and data == b"NOOP\r\n" for q, data in got):
                out.append(Check("labels", OK, f"label {FOLLOW_LABEL} set over ctnetlink: the connection's next "
                                               "line was queued (connlabel)"))
            else:
                out.append(Check("labels", FAIL, f"label {FOLLOW_LABEL} set, but the connection's next line was "
                                                 "not queued", "see iptables-connlabel"))
        except CtError as e:
            out.append(Check("labels", FAIL, f"setting conntrack label {FOLLOW_LABEL}: {e}",
                             "a kernel with conntrack labels (nf_conntrack_labels, xt_connlabel)"))
    out.append(_expectation_check(nl, events, key))
    try:
        nl.seq_adjust(key, 0, 1, 0)
        out.append(Check("seqadj", OK, "the kernel keeps a sequence correction for the connection"))
    except NoSeqAdjust:
        out.append(Check("seqadj", FAIL, "the connection has no sequence-adjustment extension: the kernel would "
                                         "ignore ftpalg's corrections", "see nft-helper and nft-nat above"))
    except CtError as e:
        out.append(Check("seqadj", FAIL, f"sequence correction: {e}"))
    return out


def _expectation_check(nl: CtNetlink, events: ExpectationEvents | None, key: tuple[bytes, int, bytes, int]) -> Check:
    peer, public = key[0], key[2]
    try:
        exp_id = nl.expect(key, peer, public, 50000, 50000, False, 120)
        deleted = nl.unexpect(peer, public, 50000, exp_id)
    except CtError as e:
        return Check("expectations", FAIL, f"create/delete over ctnetlink: {e}",
                     f"a kernel with nf_conntrack_netlink and the {HELPER} helper on the connection")
    if not deleted:
        return Check("expectations", FAIL, "an expectation was created but was gone when deleted")
    detail = "an expectation (a pinhole) created and deleted over ctnetlink"
    if events is None:
        return Check("expectations", OK, detail)
    deadline = time.monotonic() + WAIT
    heard: list[Any] = []
    while not heard and time.monotonic() < deadline:
        heard = events.read()
        if not heard:
            select.select([events], [], [], 0.05)
    if not heard:
        return Check("expectations", WARN, f"{detail}, but the kernel sent no event of its removal: ftpalg learns "
                                           "the end of a transfer late (queue = selected)",
                     "sysctl net.netfilter.nf_conntrack_events=1 (or 2)")
    return Check("expectations", OK, f"{detail}; the kernel reported its removal")


# ---- all of it ----------------------------------------------------------------------------------
def run_trials(cfg: Config, prefix: str) -> list[Check]:
    scratch = Scratch(prefix)
    try:
        scratch.up()
    except (OSError, subprocess.SubprocessError) as e:
        return [Check("scratch", FAIL, f"could not create scratch namespaces: {_first_line(e)}",
                      "run as root with iproute2 (ip netns)")]
    out = [Check("scratch", OK, f"trials in namespaces {scratch.client}, {scratch.gateway} (removed afterwards)")]
    try:
        with scratch.inside(scratch.gateway):
            out += feature_checks(cfg)
            out += nft_checks(cfg)
            out.append(nft_queue_check(cfg))
            gw = cfg.gateway
            try:
                StaticRules(cfg.control_ports, gw.queue_num, gw.queue_backend, gw.workers, cfg.queue_selected).install()
            except RuleError as e:
                out.append(Check("rules", FAIL, f"ftpalg's rules do not load: {_first_line(e)}",
                                 "see the checks above"))
                return out
            out.append(Check("rules", OK, "ftpalg's rules for this configuration load (as ftpalg run installs them)"))
            out += traffic_checks(cfg, scratch)
    except OSError as e:
        if e.errno == errno.EPERM:
            out.append(Check("trials", FAIL, f"{e}", "run as root"))
        else:
            out.append(Check("trials", FAIL, f"{_first_line(e)}"))
    finally:
        scratch.down()
    return out

