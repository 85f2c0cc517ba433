"""A network-namespace lab holding every topology the ALG must handle, built once::

  <p>-c    inside clients   c0  10.0.0.2  10.0.0.3  fd00:1::2  fd00:1::3
                                default via 10.0.0.1, fd00:1::1
    │ c0 ── gi
  <p>-gw   gateway 1        gi  10.0.0.1  fd00:1::1
           (client NAT)     go  203.0.113.1  2001:db8:1::1; default via 203.0.113.254, 2001:db8:1::fe
                            MASQUERADE and NAT66 MASQUERADE out of go;
                            FORWARD DROP but ESTABLISHED,RELATED and gi -> go (IPv4 and IPv6)
    │ go ── s0
  <p>-s    "the internet"   s0  203.0.113.254  2001:db8:1::fe (router)
           ip_forward,          servers   203.0.113.2 vsftpd, .3 pyftpdlib, .4 proftpd, .5 pure-ftpd
           no firewall,                   2001:db8:1::2 .. ::5 (same order)
           no route to          clients   203.0.113.100, .101 (unrelated)   2001:db8:1::100, ::101
           10/8 or fd00::/8 s1  198.51.100.254  2001:db8:2::fe; 2001:db8:3::/64 via 2001:db8:2::1
    │ s1 ── go
  <p>-gw2  gateway 2        go  198.51.100.1 (own), .2 .3 .4 .5 .6 (public)  2001:db8:2::1
           (server DNAT)        default via 198.51.100.254, 2001:db8:2::fe
                            gi  10.1.0.1  2001:db8:3::1
                            DNAT 198.51.100.2..5 tcp/21 -> 10.1.0.2..5:21 (port 21 only, no SNAT),
                                 198.51.100.3:2121 -> 10.1.0.3:21 (a different public control port),
                                 198.51.100.6:21 -> 10.1.0.2:21 and SNAT to 10.1.0.1 (both NATs);
                            FORWARD DROP but ESTABLISHED,RELATED and NEW DNATed tcp/21;
                            IPv6 without NAT: FORWARD DROP but ESTABLISHED,RELATED, ICMPv6 errors
                            and NEW tcp/21 to 2001:db8:3::/64
    │ gi ── i0
  <p>-i    inside servers   i0  10.1.0.2 vsftpd, .3 pyftpdlib, .4 proftpd, .5 pure-ftpd
                                2001:db8:3::2 .. ::5 (same order); default via 10.1.0.1, 2001:db8:3::1

Paths: inside client -> gw1 -> outside server (client NAT); outside client -> gw2 -> inside
server (server DNAT); inside client -> gw1 -> 198.51.100.x -> gw2 -> inside server (double
NAT); IPv6 through NAT66 at gw1 and through a stateful gateway without NAT at gw2. Only
control connections are let through: without an ALG, active mode fails at gw1 and passive
mode at gw2, and inside servers cannot open any connection of their own. No FTP conntrack
helper anywhere. A server runs on every address above for each kind in
``servers.SERVER_KINDS`` (the others' addresses stay unused).

Everything lives in namespaces this module creates (the veths are created inside them);
nothing is added to the host's own namespace. ``down()`` kills every process left in the
namespaces, deletes them and the lab's files, also after a failed ``up()``. Not for
production paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import servers

# ---- addresses --------------------------------------------------------------------------------
_HOST = {"vsftpd": 2, "pyftpdlib": 3, "proftpd": 4, "pure-ftpd": 5}
"""Host part of each server kind's addresses, in every network that holds servers."""
_KINDS = [k for k in servers.SERVER_KINDS if k in _HOST]  # kinds the lab has addresses for

# gw1's inside: clients behind MASQUERADE / NAT66.
CLIENT_NET = "10.0.0"
CLIENT_NET6 = "fd00:1:"
GW_INSIDE = f"{CLIENT_NET}.1"
GW_INSIDE6 = f"{CLIENT_NET6}:1"
CLIENTS = (f"{CLIENT_NET}.2", f"{CLIENT_NET}.3")
CLIENTS6 = (f"{CLIENT_NET6}:2", f"{CLIENT_NET6}:3")

# The link between gw1 and "the internet": outside servers and outside clients.
PUBLIC_NET = "203.0.113"
PUBLIC_NET6 = "2001:db8:1:"
GW_PUBLIC = f"{PUBLIC_NET}.1"
GW_PUBLIC6 = f"{PUBLIC_NET6}:1"
ROUTER = f"{PUBLIC_NET}.254"
# Ports that tests and examples bind on purpose (active-mode data ports, listeners): below the
# ephemeral range of every lab namespace, so no earlier connection holds them. (Reserving them
# inside the range instead made bind(0) land on the first free port after the reserved block
# about a fifth of the time: 43001 again and again, then "425 Cannot assign requested address"
# from servers connecting from port 20 to a port still in TIME_WAIT.)
FIXED_PORTS = (40000, 42999)
EPHEMERAL_PORTS = (43000, 60999)
ROUTER6 = f"{PUBLIC_NET6}:fe"
SERVERS = {k: f"{PUBLIC_NET}.{_HOST[k]}" for k in _KINDS}
"""Outside servers (kind -> IPv4 address) in <p>-s."""
SERVERS6 = {k: f"{PUBLIC_NET6}:{_HOST[k]:x}" for k in _KINDS}
OUTSIDE_CLIENTS = (f"{PUBLIC_NET}.100", f"{PUBLIC_NET}.101")
"""Clients on the internet, in <p>-s; the second one is unrelated to any session of the first."""
OUTSIDE_CLIENTS6 = (f"{PUBLIC_NET6}:100", f"{PUBLIC_NET6}:101")

# The link between "the internet" and gw2.
GW2_NET = "198.51.100"
GW2_NET6 = "2001:db8:2:"
GW2_PUBLIC = f"{GW2_NET}.1"
GW2_PUBLIC6 = f"{GW2_NET6}:1"
ROUTER2 = f"{GW2_NET}.254"
ROUTER2_6 = f"{GW2_NET6}:fe"
PUBLIC_OF = {k: f"{GW2_NET}.{_HOST[k]}" for k in _KINDS}
"""Public address at gw2 of each inside server (kind -> IPv4); only its port 21 is forwarded."""
FORWARDED_PORT = (f"{GW2_NET}.3", 2121)
"""A public control port that differs from the server's: -> pyftpdlib 10.1.0.3:21."""
BOTH_NAT_PUBLIC = f"{GW2_NET}.6"
"""Port 21 here -> vsftpd 10.1.0.2:21 with the client SNATed to GW2_INSIDE (both NATs at gw2)."""

# gw2's inside: servers behind DNAT (IPv4), globally addressed behind a stateful gateway (IPv6).
INSIDE_NET = "10.1.0"
INSIDE_NET6 = "2001:db8:3:"
GW2_INSIDE = f"{INSIDE_NET}.1"
GW2_INSIDE6 = f"{INSIDE_NET6}:1"
INSIDE_SERVERS = {k: f"{INSIDE_NET}.{_HOST[k]}" for k in _KINDS}
INSIDE_SERVERS6 = {k: f"{INSIDE_NET6}:{_HOST[k]:x}" for k in _KINDS}

STATE_ROOT = Path("/run/ftpalg-lab")
FILE_SIZES = {"small.txt": 1000, "big.bin": 2 * 1024 * 1024}
SUFFIXES = ("c", "gw", "s", "gw2", "i")
"""Namespace names are <prefix>-<suffix>."""

# ---- firewalls ---------------------------------------------------------------------------------
# Each gateway has an inside interface "gi" and an outside interface "go".
def client_nat_firewall(source_nat: str) -> str:
    """iptables-restore text of a gateway with clients inside: FORWARD DROP but for what the
    inside starts and what belongs to it, and ``source_nat`` (a target) on the way out."""
    return f"""*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -i gi -o go -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -o go -j {source_nat}
COMMIT
"""


GW1_FIREWALL = client_nat_firewall("MASQUERADE")
FIREWALL = GW1_FIREWALL  # the name of earlier versions
GW1_FIREWALL6 = GW1_FIREWALL  # the same rules with NAT66


def _gw2_firewall() -> str:
    dnat = [(pub, 21, INSIDE_SERVERS[k]) for k, pub in PUBLIC_OF.items()]
    if "pyftpdlib" in INSIDE_SERVERS:
        dnat.append((*FORWARDED_PORT, INSIDE_SERVERS["pyftpdlib"]))
    if "vsftpd" in INSIDE_SERVERS:
        dnat.append((BOTH_NAT_PUBLIC, 21, INSIDE_SERVERS["vsftpd"]))
    lines = [
        "*filter", ":INPUT ACCEPT [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
        "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A FORWARD -i go -o gi -p tcp -m tcp --dport 21 -m conntrack --ctstate DNAT -j ACCEPT",
        "COMMIT",
        "*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        *[f"-A PREROUTING -d {pub}/32 -i go -p tcp -m tcp --dport {port} -j DNAT --to-destination {priv}:21"
          for pub, port, priv in dnat],
        f"-A POSTROUTING -o gi -m conntrack --ctorigdst {BOTH_NAT_PUBLIC}/32 -j SNAT --to-source {GW2_INSIDE}",
        "COMMIT", "",
    ]
    return "\n".join(lines)


GW2_FIREWALL = _gw2_firewall()
GW2_FIREWALL6 = "\n".join([
    "*filter", ":INPUT ACCEPT [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
    "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
    # ICMPv6 errors (RFC 4890); neighbour discovery is link-local: INPUT/OUTPUT accept it.
    *[f"-A FORWARD -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j ACCEPT" for t in (1, 2, 3, 4)],
    f"-A FORWARD -d {INSIDE_NET6}:/64 -i go -o gi -p tcp -m tcp --dport 21 -m conntrack --ctstate NEW -j ACCEPT",
    "COMMIT", "",
])


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


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ftpalg_argv() -> list[str]:
    """How to start the CLI: the installed console script, as users run it."""
    script = Path(sys.executable).parent / "ftpalg"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ftpalg"]


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


@dataclass(frozen=True)
class _Node:
    """What one namespace is given: addresses per device, routes, whether it forwards, rules."""

    suffix: str
    addrs: dict[str, list[str]]
    routes: list[str] = field(default_factory=list)
    router: bool = False
    rules4: str = ""
    rules6: str = ""


def _nodes() -> list[_Node]:
    s0 = ([f"{a}/24" for a in SERVERS.values()] + [f"{a}/24" for a in OUTSIDE_CLIENTS] + [f"{ROUTER}/24"]
          + [f"{a}/64" for a in SERVERS6.values()] + [f"{a}/64" for a in OUTSIDE_CLIENTS6] + [f"{ROUTER6}/64"])
    return [
        _Node("c", {"c0": [f"{a}/24" for a in CLIENTS] + [f"{a}/64" for a in CLIENTS6]},
              [f"default via {GW_INSIDE}", f"::/0 via {GW_INSIDE6}"]),
        _Node("gw", {"gi": [f"{GW_INSIDE}/24", f"{GW_INSIDE6}/64"], "go": [f"{GW_PUBLIC}/24", f"{GW_PUBLIC6}/64"]},
              [f"default via {ROUTER}", f"::/0 via {ROUTER6}"], True, GW1_FIREWALL, GW1_FIREWALL6),
        _Node("s", {"s0": s0, "s1": [f"{ROUTER2}/24", f"{ROUTER2_6}/64"]},
              [f"{INSIDE_NET6}:/64 via {GW2_PUBLIC6}"], True),
        _Node("gw2", {"go": [f"{GW2_PUBLIC}/24", *[f"{a}/32" for a in PUBLIC_OF.values()], f"{BOTH_NAT_PUBLIC}/32",
                             f"{GW2_PUBLIC6}/64"],
                      "gi": [f"{GW2_INSIDE}/24", f"{GW2_INSIDE6}/64"]},
              [f"default via {ROUTER2}", f"::/0 via {ROUTER2_6}"], True, GW2_FIREWALL, GW2_FIREWALL6),
        _Node("i", {"i0": [f"{a}/24" for a in INSIDE_SERVERS.values()] + [f"{a}/64" for a in INSIDE_SERVERS6.values()]},
              [f"default via {GW2_INSIDE}", f"::/0 via {GW2_INSIDE6}"]),
    ]


LINKS = (("c", "c0", "gw", "gi"), ("gw", "go", "s", "s0"), ("s", "s1", "gw2", "go"), ("gw2", "gi", "i", "i0"))
"""veth pairs: (namespace suffix, device, peer's namespace suffix, peer device)."""


@dataclass
class Lab:
    prefix: str = "ftpalg"
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def client(self) -> str:
        """Inside clients, behind gw1."""
        return f"{self.prefix}-c"

    @property
    def gw(self) -> str:
        """Gateway 1: MASQUERADE / NAT66 for the inside clients."""
        return f"{self.prefix}-gw"

    @property
    def server(self) -> str:
        """"The internet": outside servers and clients, routes between gw1 and gw2."""
        return f"{self.prefix}-s"

    @property
    def gw2(self) -> str:
        """Gateway 2: DNAT of the inside servers' control ports; IPv6 without NAT."""
        return f"{self.prefix}-gw2"

    @property
    def inside(self) -> str:
        """Inside servers, behind gw2."""
        return f"{self.prefix}-i"

    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(f"{self.prefix}-{s}" for s in SUFFIXES)

    @property
    def gateways(self) -> tuple[str, str]:
        return (self.gw, self.gw2)

    @property
    def state(self) -> Path:
        return STATE_ROOT / self.prefix

    @property
    def files(self) -> Path:
        """Files every server offers (anonymous root)."""
        return self.state / "pub"

    def server_instances(self) -> list[tuple[str, str, str]]:
        """(namespace, kind, address) of every server the lab runs, all on port 21."""
        return ([(self.server, k, a) for k, a in SERVERS.items()] + [(self.server, k, a) for k, a in SERVERS6.items()]
                + [(self.inside, k, a) for k, a in INSIDE_SERVERS.items()]
                + [(self.inside, k, a) for k, a in INSIDE_SERVERS6.items()])

    def server_state(self, kind: str, addr: str) -> Path:
        """The state directory (configuration, logs) of one server instance."""
        return self.state / "servers" / f"{kind}-{addr}"

    def ns(self, name: str, argv: list[str], check: bool = True,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", name, *argv], check=check, timeout=timeout)

    def popen(self, name: str, argv: list[str], log: Path | None = None,
              stdin_log: bool = False) -> subprocess.Popen[bytes]:
        """``popen_in``, the process kept for ``down()``."""
        p = popen_in(name, argv, log, stdin_log)
        self.procs.append(p)
        return p

    # ---- topology ------------------------------------------------------------------------
    def up(self, servers: bool = True) -> None:
        self.down()
        try:
            self.state.mkdir(parents=True, exist_ok=True)
            self._topology()
            self._files()
            if servers:
                self.start_servers()
        except BaseException:
            self.down()
            raise

    def _topology(self) -> None:
        p = self.prefix
        add_namespaces(self.namespaces, [(f"{p}-{a}", d, f"{p}-{b}", pd) for a, d, b, pd in LINKS])
        # Links are up everywhere before any route is added or any server binds.
        first, second = [], []
        for node in _nodes():
            devs = list(node.addrs)
            keys = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                    "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                    *[f"net.ipv6.conf.{d}.{k}" for d in devs
                      for k in ("accept_dad=0", "disable_ipv6=0", "accept_ra=0")],
                    *[f"net.ipv4.conf.{d}.rp_filter=0" for d in devs],
                    # Fixed data ports of tests and examples: never an ephemeral port left in
                    # TIME_WAIT by an earlier connection (bind would fail with EADDRINUSE).
                    "net.ipv4.ip_local_port_range='{} {}'".format(*EPHEMERAL_PORTS),
                    # Servers that connect from port 20 (pure-ftpd, vsftpd) meet a client data port
                    # they used within the last minute now and then: without reusing the TIME_WAIT
                    # entry, connect fails ("425 ... Cannot assign requested address").
                    "net.ipv4.tcp_tw_reuse=1"]
            if node.router:
                keys += ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]
            script = ["set -e", f"sysctl -qw {' '.join(keys)}",
                      # No FTP helper: gone from the kernel since 6.0, off by default before.
                      "h=/proc/sys/net/netfilter/nf_conntrack_helper; if [ -e $h ]; then echo 0 > $h; fi",
                      "ip -batch - <<'EOF'", *link_batch(node.addrs), "EOF"]
            first.append(self._script(node.suffix, "links", script))
            script = ["set -e", "ip -batch - <<'EOF'", *[f"route add {r}" for r in node.routes], "EOF"]
            if node.rules4:
                script += ["iptables-restore <<'EOF'", node.rules4.rstrip("\n"), "EOF"]
            if node.rules6:
                script += ["ip6tables-restore <<'EOF'", node.rules6.rstrip("\n"), "EOF"]
            second.append(self._script(node.suffix, "routes", script))
        run_all(first)
        run_all(second)

    def _script(self, suffix: str, step: str, lines: list[str]) -> tuple[list[str], None]:
        """A shell script run in a namespace, kept in the state directory for inspection."""
        path = self.state / "setup" / f"{suffix}-{step}.sh"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return ["ip", "netns", "exec", f"{self.prefix}-{suffix}", "sh", str(path)], None

    def _files(self) -> None:
        self.files.mkdir(parents=True, exist_ok=True)
        self.files.chmod(0o755)
        for name, size in FILE_SIZES.items():
            (self.files / name).write_bytes(os.urandom(size))
        up = self.files / "upload"
        up.mkdir(exist_ok=True)
        shutil.chown(up, "ftp", "ftp")
        up.chmod(0o755)
        (self.state / "empty").mkdir(exist_ok=True)

    def start_servers(self) -> None:
        """Start every server instance at once, then wait for all of them together."""
        started = []
        for ns, kind, addr in self.server_instances():
            state = self.server_state(kind, addr)
            argv = servers.server_command(kind, addr, self.files, state)
            started.append((self.popen(ns, argv, state / "server.out", stdin_log=True), state / "server.out"))
        want: dict[str, list[tuple[str, int]]] = {}
        for ns, _, addr in self.server_instances():
            want.setdefault(ns, []).append((addr, 21))
        try:
            self.wait_ports(want, watch=[p for p, _ in started])
        except LabError as e:
            logs = [f"--- {log}:\n{log.read_text(errors='replace')[-2000:]}" for p, log in started
                    if p.poll() is not None]
            raise LabError("\n".join([str(e), *logs])) from None

    def wait_port(self, ns: str, addr: str, port: int, timeout: float = 10.0) -> None:
        self.wait_ports({ns: [(addr, port)]}, timeout)

    def wait_ports(self, want: dict[str, list[tuple[str, int]]], timeout: float = 10.0,
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

    def down(self) -> None:
        # Also whatever else runs in the namespaces: `ftpalg lab up` servers, servers' sessions
        # in sessions of their own (some, stuck connecting out through a DROP, ignore SIGTERM).
        teardown(self.procs, self.namespaces, self.state)
        with contextlib.suppress(OSError):
            STATE_ROOT.rmdir()

    def exists(self) -> bool:
        """Whether any namespace of the lab exists."""
        return bool(self.leftovers())

    def leftovers(self) -> list[str]:
        """The lab's namespaces that exist."""
        names = netns_list()
        return [n for n in self.namespaces if n in names]

    # ---- inspection -----------------------------------------------------------------------
    def _gw(self, gw: str | None) -> str:
        return self.gw if gw is None else gw

    def gw_rules(self, gw: str | None = None) -> str:
        """iptables-save of a gateway (gw1 by default), without counters."""
        return self.ns(self._gw(gw), ["iptables-save"]).stdout

    def gw_rules6(self, gw: str | None = None) -> str:
        """ip6tables-save of a gateway (gw1 by default), without counters."""
        return self.ns(self._gw(gw), ["ip6tables-save"]).stdout

    def expectations(self, gw: str | None = None) -> list[str]:
        """The pinholes open in a gateway (gw1 by default): its conntrack expectations, IPv4
        then IPv6, as ``conntrack -L expect`` prints them."""
        out = []
        for family in ("ipv4", "ipv6"):
            res = self.ns(self._gw(gw), ["conntrack", "-L", "expect", "-f", family], check=False)
            out += [line for line in res.stdout.splitlines() if "proto=" in line]
        return out

    def ruleset(self, gw: str | None = None) -> str:
        """A gateway's whole nftables ruleset (iptables-nft's tables included), without
        counters: what must be the same before ftpalg starts and after it exits."""
        return self.ns(self._gw(gw), ["nft", "-s", "list", "ruleset"]).stdout

    # ---- captures --------------------------------------------------------------------------
    def capture(self, ns: str, dev: str, path: Path, bpf: str = "tcp port 21",
                timeout: float = 10.0) -> subprocess.Popen[bytes]:
        """Start tcpdump on ``dev`` in ``ns`` writing ``path``; return once it listens.

        --immediate-mode: with TPACKET_V3's block timeout, this kernel's veth delivered
        almost nothing to the ring (seen: "25 packets received by filter, 0 captured")."""
        argv = ["ip", "netns", "exec", ns, "tcpdump", "--immediate-mode", "-i", dev, "-U", "-n", "-w", str(path), bpf]
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert p.stderr is not None
        ready = select.select([p.stderr], [], [], timeout)[0]
        line = p.stderr.readline() if ready else b""
        if b"listening on" not in line:
            p.kill()
            p.wait()
            raise LabError(f"tcpdump on {ns}/{dev} did not start: {line.decode(errors='replace')}")
        return p

    @staticmethod
    def stop_capture(p: subprocess.Popen[bytes]) -> None:
        time.sleep(0.3)  # let the last packets reach the file
        p.terminate()
        p.wait(10)

    # ---- ftpalg in a gateway ---------------------------------------------------------------
    def ftpalg_log_path(self, gw: str | None = None) -> Path:
        gw = self._gw(gw)
        return self.state / ("ftpalg.log" if gw == self.gw else f"ftpalg-{gw.removeprefix(self.prefix + '-')}.log")

    def start_ftpalg(self, *args: str, gw: str | None = None, timeout: float = 15.0) -> subprocess.Popen[bytes]:
        """Start ``ftpalg run`` in a gateway's namespace (gw1 by default) and wait until it
        is bound. Each gateway has its own log: both can run at once."""
        log = self.ftpalg_log_path(gw)
        log.write_bytes(b"")
        p = self.popen(self._gw(gw), [*ftpalg_argv(), "run", "--log-level", "info", *args], log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"bound to NFQUEUE" in log.read_bytes():
                return p
            if p.poll() is not None:
                break
            time.sleep(0.05)
        self.stop_ftpalg(p)
        raise LabError(f"ftpalg did not start in {self._gw(gw)}:\n{log.read_text()}")

    def stop_ftpalg(self, p: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # ip netns exec passes it on (it execs)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait(5)
        if p in self.procs:
            self.procs.remove(p)
        return rc

    def ftpalg_log(self, gw: str | None = None) -> str:
        path = self.ftpalg_log_path(gw)
        return path.read_text() if path.exists() else ""

    # ---- clients ---------------------------------------------------------------------------
    def transfer(self, client: ClientKind, server: str, remote: str, out: Path,
                 timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Download ``remote`` from ``server`` (a name in SERVERS) to ``out`` with ``client``."""
        return self.ns(self.client, client.argv(SERVERS[server], remote, out), check=False, timeout=timeout)


@dataclass(frozen=True)
class ClientKind:
    """A real FTP client in active mode, announcing its data port with ``form``."""

    name: str
    form: str  # "PORT" or "EPRT"

    def argv(self, host: str, remote: str, out: Path) -> list[str]:
        url = f"ftp://{host}/{remote}"
        if self.name == "curl":
            extra = ["--disable-eprt"] if self.form == "PORT" else []
            return ["curl", "-sSv", "--max-time", "20", "--ftp-port", "-", *extra, "-o", str(out), url]
        if self.name == "lftp":
            script = ("set ftp:passive-mode off; set ftp:auto-passive-mode no; set net:max-retries 1; "
                      f"set net:timeout 10; set xfer:clobber on; get {remote} -o {out}; bye")
            return ["lftp", "-e", script, f"ftp://{host}"]
        if self.name == "ftplib":
            extra = ["--eprt"] if self.form == "EPRT" else []
            return [sys.executable, "-m", "ftpalg.lab.ftpclient", host, "get", remote, str(out), *extra]
        raise ValueError(self.name)

    @property
    def label(self) -> str:
        return f"{self.name} {self.form}"


CLIENT_KINDS = (
    ClientKind("curl", "PORT"), ClientKind("curl", "EPRT"), ClientKind("lftp", "PORT"),
    ClientKind("ftplib", "PORT"), ClientKind("ftplib", "EPRT"),
)
