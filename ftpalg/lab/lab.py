"""The lab: one ``Lab`` holding every topology the ALG must handle, built once in network
namespaces named ``<prefix>-<suffix>``. ``topology`` describes it (the namespaces, addresses,
routes and gateway firewalls, with a diagram) and builds it; ``netns`` is the plumbing of
namespaces and their processes that every lab of this package shares. ``Lab`` brings it up
with the real servers of ``servers`` on every server address, runs ftpalg in a gateway,
captures, inspects the gateways' rules and conntrack expectations, and runs clients.

``down()`` kills every process left in the namespaces, deletes them and the lab's files, also
after a failed ``up()``. The public names of ``topology`` and ``netns`` are importable from
here too, as before they moved. Not for production paths.
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import netns, servers, topology
from .netns import (
    WAIT_PORTS,
    LabError,
    add_namespaces,
    kill_namespace_processes,
    link_batch,
    netns_list,
    popen_in,
    remove_namespaces,
    run,
    run_all,
    stop_processes,
    teardown,
)
from .topology import (
    BOTH_NAT_PUBLIC,
    CLIENT_NET,
    CLIENT_NET6,
    CLIENTS,
    CLIENTS6,
    EPHEMERAL_PORTS,
    FIREWALL,
    FIXED_PORTS,
    FORWARDED_PORT,
    GW1_FIREWALL,
    GW1_FIREWALL6,
    GW2_FIREWALL,
    GW2_FIREWALL6,
    GW2_INSIDE,
    GW2_INSIDE6,
    GW2_NET,
    GW2_NET6,
    GW2_PUBLIC,
    GW2_PUBLIC6,
    GW_INSIDE,
    GW_INSIDE6,
    GW_PUBLIC,
    GW_PUBLIC6,
    INSIDE_NET,
    INSIDE_NET6,
    INSIDE_SERVERS,
    INSIDE_SERVERS6,
    LINKS,
    OUTSIDE_CLIENTS,
    OUTSIDE_CLIENTS6,
    PUBLIC_NET,
    PUBLIC_NET6,
    PUBLIC_OF,
    ROUTER,
    ROUTER2,
    ROUTER2_6,
    ROUTER6,
    SERVERS,
    SERVERS6,
    SUFFIXES,
    client_nat_firewall,
)

__all__ = [
    # topology
    "BOTH_NAT_PUBLIC", "CLIENT_NET", "CLIENT_NET6", "CLIENTS", "CLIENTS6", "EPHEMERAL_PORTS", "FIREWALL",
    "FIXED_PORTS", "FORWARDED_PORT", "GW1_FIREWALL", "GW1_FIREWALL6", "GW2_FIREWALL", "GW2_FIREWALL6",
    "GW2_INSIDE", "GW2_INSIDE6", "GW2_NET", "GW2_NET6", "GW2_PUBLIC", "GW2_PUBLIC6", "GW_INSIDE", "GW_INSIDE6",
    "GW_PUBLIC", "GW_PUBLIC6", "INSIDE_NET", "INSIDE_NET6", "INSIDE_SERVERS", "INSIDE_SERVERS6", "LINKS",
    "OUTSIDE_CLIENTS", "OUTSIDE_CLIENTS6", "PUBLIC_NET", "PUBLIC_NET6", "PUBLIC_OF", "ROUTER", "ROUTER2",
    "ROUTER2_6", "ROUTER6", "SERVERS", "SERVERS6", "SUFFIXES", "client_nat_firewall",
    # netns
    "WAIT_PORTS", "LabError", "add_namespaces", "kill_namespace_processes", "link_batch", "netns_list",
    "popen_in", "remove_namespaces", "run", "run_all", "stop_processes", "teardown",
    # this module
    "CLIENT_KINDS", "FILE_SIZES", "STATE_ROOT", "ClientKind", "Lab", "ftpalg_argv", "sha256",
]

STATE_ROOT = Path("/run/ftpalg-lab")
FILE_SIZES = {"small.txt": 1000, "big.bin": 2 * 1024 * 1024}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ftpalg_argv() -> list[str]:
    """How to start the CLI: the installed console script, as users run it."""
    script = Path(sys.executable).parent / "ftpalg"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ftpalg"]


@dataclass
class Lab:
    """One lab, its namespaces named ``<prefix>-<suffix>`` (see ``topology``); ``procs``: the
    processes ``down()`` stops."""

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
    def gateways(self) -> tuple[str, ...]:
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

    # ---- up, servers, down ---------------------------------------------------------------
    def up(self, servers: bool = True) -> None:
        self.down()
        try:
            self.state.mkdir(parents=True, exist_ok=True)
            self.build()
            self._files()
            if servers:
                self.start_servers()
        except BaseException:
            self.down()
            raise

    def build(self) -> None:
        """Create the namespaces, links, addresses, routes and firewalls (``topology``)."""
        topology.build(self.prefix, self.state / "setup")

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
            argv = self.server_command(kind, addr, state)
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

    def server_command(self, kind: str, addr: str, state: Path) -> list[str]:
        """``servers.server_command`` of one server instance, serving ``files``."""
        return servers.server_command(kind, addr, self.files, state)

    @contextlib.contextmanager
    def vsftpd_passive_ports(self, lo: int, hi: int) -> Iterator[None]:
        """The lab's vsftpd behind gw2 restarted with passive ports ``lo``-``hi`` only, so that
        sessions close together get the same port (vsftpd takes a port again as soon as its data
        connection is accepted); the lab's own configuration is restored after."""
        addr = INSIDE_SERVERS["vsftpd"]
        state = self.server_state("vsftpd", addr)
        conf = str(state / "vsftpd.conf")
        old = [p for p in self.procs if isinstance(p.args, list) and conf in p.args]
        if not old:
            raise LabError(f"no vsftpd with {conf} in the lab")
        stop_processes(old)
        for p in old:
            self.procs.remove(p)
        narrow = self.state / "vsftpd-narrow"
        proc = self.popen(self.inside, servers.server_command("vsftpd", addr, self.files, narrow,
                                                              extra_config=f"pasv_min_port={lo}\npasv_max_port={hi}\n"),
                          narrow / "server.out", stdin_log=True)
        try:
            self.wait_port(self.inside, addr, 21)
            yield
        finally:
            stop_processes([proc])
            self.procs.remove(proc)
            self.popen(self.inside, servers.server_command("vsftpd", addr, self.files, state), state / "server.out",
                       stdin_log=True)
            self.wait_port(self.inside, addr, 21)

    def wait_port(self, ns: str, addr: str, port: int, timeout: float = 10.0) -> None:
        self.wait_ports({ns: [(addr, port)]}, timeout)

    def wait_ports(self, want: dict[str, list[tuple[str, int]]], timeout: float = 10.0,
                   watch: Iterable[subprocess.Popen[bytes]] = ()) -> None:
        """``netns.wait_ports``: something listens on each (address, port) of each namespace."""
        netns.wait_ports(want, timeout, watch)

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
