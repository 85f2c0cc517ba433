"""The NAT64 lab: IPv6-only clients reach IPv4-only FTP servers through a stateful NAT64
made of Tayga (Debian's ``tayga`` 0.9.2, stateless IPv6 <-> IPv4 translation on a TUN
device) and iptables MASQUERADE of Tayga's dynamic pool, as a Linux admin builds one::

  <p>-c    IPv6-only clients  c0  fd00:64::2  fd00:64::3   default via fd00:64::1 (no IPv4)
    │ c0 ── gi
  <p>-gw   NAT64 gateway      gi     fd00:64::1
                              nat64  TUN of tayga: 2001:db8:64::/96 <-> pool 192.168.255.0/24
                                     (tayga's own 192.168.255.1), routes of both via nat64
                              go     203.0.113.1 (the only IPv4 address the servers see)
                              IPv6: FORWARD DROP but ESTABLISHED,RELATED and gi -> nat64
                              IPv4: FORWARD DROP but ESTABLISHED,RELATED and nat64 -> go;
                                    MASQUERADE of the pool out of go
    │ go ── s0
  <p>-s    IPv4-only servers  s0  203.0.113.2 vsftpd, .3 pyftpdlib, .4 proftpd, .5 pure-ftpd,
           ("the internet")       .6 twisted (no EPSV, no EPRT), .7 pyftpdlib announcing
                                  203.0.113.99 in its 227s (not its address);
                                  203.0.113.100 an unrelated host; no route to the pool,
                                  no IPv6 address

A client reaches server ``a.b.c.d`` at ``2001:db8:64::a.b.c.d`` (``synthesized()``, what
DNS64 would answer). The control connection is seen twice in the gateway: as IPv6 from the
client to the synthesised address (gi -> nat64), then, after Tayga, as IPv4 from the pool
address Tayga gave the client (192.168.255.x) to the server, MASQUERADEd to 203.0.113.1
(nat64 -> go). Passive data connections go the same way and need no pinhole (inside -> out
is allowed); an active one (the server connecting to the client) needs one in each family:
IPv4 go -> nat64 to the pool address, then IPv6 nat64 -> gi to the client.

Tayga refuses the well-known prefix ``64:ff9b::/96`` with this lab's addresses: its
configuration needs an ``ipv6-addr`` when ``ipv4-addr`` is private (RFC 1918), and it does not
translate to non-global IPv4 destinations such as 203.0.113.0/24 (RFC 6052 section 3.1; the
client gets "Network is unreachable"), so the lab uses a network-specific prefix.

Tayga runs in the foreground (``-d``) as a process of the lab's own (in ``procs``), its TUN
device made persistent first (``--mktun``) so that its routes exist before it runs; the
device lives in the gateway's namespace and goes with it. Its configuration and its
``data-dir`` (the dynamic map) are in the lab's state directory. ``down()`` stops it by its
PID, then removes the namespaces (with whatever still runs in them) and the state directory,
also after a failed ``up()``.

``NAT64_OPTIONS`` is what ``ftpalg run`` is given in this lab (README: what NAT64 needs).
``python -m ftpalg.lab.nat64 talk HOST STEP...`` is a client for single commands (``ALGS
STATUS64``, ``EPSV ALL``) followed by transfers on the same control connection;
``python -m ftpalg.lab.nat64 matrix`` builds the lab and prints the server x client matrix
without and with ftpalg (docs/nat64-lab.md).
"""

from __future__ import annotations

import argparse
import ftplib
import hashlib
import ipaddress
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import clients, servers
from .lab import Lab, LabError, sha256
from .netns import run
from .topology import Node, build

PREFIX6 = "2001:db8:64::/96"
"""Tayga's NAT64 prefix (network-specific: Tayga 0.9.2 refuses 64:ff9b::/96 here)."""
POOL = "192.168.255.0/24"
"""Tayga's dynamic pool: the IPv4 address each IPv6 client gets, MASQUERADEd out of go."""
TAYGA_ADDR = "192.168.255.1"
"""Tayga's own IPv4 address (in the pool's network, never given to a client)."""
TUN = "nat64"
CLIENT_NET6 = "fd00:64:"
GW_INSIDE6 = f"{CLIENT_NET6}:1"
CLIENTS6 = (f"{CLIENT_NET6}:2", f"{CLIENT_NET6}:3")
"""IPv6-only clients in <p>-c (the second one for what one client must not get of another's)."""
PUBLIC_NET = "203.0.113"
GW_PUBLIC = f"{PUBLIC_NET}.1"
SERVER_HOSTS = {"vsftpd": 2, "pyftpdlib": 3, "proftpd": 4, "pure-ftpd": 5, servers.NO_EPSV_KIND: 6}
SERVERS = {k: f"{PUBLIC_NET}.{h}" for k, h in SERVER_HOSTS.items()}
"""IPv4-only servers (kind -> address) in <p>-s: the lab's four and Twisted's, without EPSV."""
MISANNOUNCING = (f"{PUBLIC_NET}.7", f"{PUBLIC_NET}.99")
"""A pyftpdlib (not in SERVERS) at the first address whose 227 names the second, an address
that is not the server's (a misconfigured masquerade address): RFC 6384 lets the ALG refuse it."""
UNRELATED = f"{PUBLIC_NET}.100"
"""An IPv4 host on the internet, in <p>-s, that takes part in no session."""
SUFFIXES = ("c", "gw", "s")

NAT64_OPTIONS: tuple[str, ...] = ("--nat64-pool", POOL, "--nat64-prefix", PREFIX6)
"""What ``ftpalg run`` is given in this lab, and only that: Tayga's ``dynamic-pool`` (the
connections from it are the translated ones) and its ``prefix`` (which LPSV's 228 needs)."""

GW_FIREWALL = f"""*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -i {TUN} -o go -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -s {POOL} -o go -j MASQUERADE
COMMIT
"""
GW_FIREWALL6 = f"""*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -i gi -o {TUN} -j ACCEPT
COMMIT
"""

TAYGA_CONF = """tun-device {tun}
ipv4-addr {addr}
prefix {prefix}
dynamic-pool {pool}
data-dir {data}
"""


def synthesized(ipv4: str) -> str:
    """The IPv6 address under which IPv6-only clients reach ``ipv4`` (RFC 6052, /96)."""
    net = ipaddress.IPv6Network(PREFIX6)
    return str(net[int(ipaddress.IPv4Address(ipv4))])


SERVERS6 = {k: synthesized(a) for k, a in SERVERS.items()}
"""kind -> the synthesised IPv6 address a client connects to."""


def nodes() -> list[Node]:
    s0 = [f"{a}/24" for a in (*SERVERS.values(), MISANNOUNCING[0], UNRELATED)]
    return [
        Node("c", {"c0": [f"{a}/64" for a in CLIENTS6]}, [f"::/0 via {GW_INSIDE6}"]),
        Node("gw", {"gi": [f"{GW_INSIDE6}/64"], "go": [f"{GW_PUBLIC}/24"]}, [], True, GW_FIREWALL, GW_FIREWALL6),
        Node("s", {"s0": s0}),
    ]


LINKS = (("c", "c0", "gw", "gi"), ("gw", "go", "s", "s0"))


@dataclass
class Nat64Lab(Lab):
    """The NAT64 lab, namespaces ``<prefix>-c``, ``-gw``, ``-s`` (``Lab``'s names: ``client``,
    ``gw``, ``server``); ``up()``, ``down()``, ``start_ftpalg()`` etc. as there."""

    prefix: str = "ftpalg-nat64"

    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(f"{self.prefix}-{s}" for s in SUFFIXES)

    @property
    def gateways(self) -> tuple[str, ...]:
        return (self.gw,)

    def server_instances(self) -> list[tuple[str, str, str]]:
        return [(self.server, k, a) for k, a in SERVERS.items()] + [(self.server, "pyftpdlib", MISANNOUNCING[0])]

    def server_command(self, kind: str, addr: str, state: Path) -> list[str]:
        masquerade = MISANNOUNCING[1] if addr == MISANNOUNCING[0] else None
        return servers.server_command(kind, addr, self.files, state, pasv_address=masquerade)

    def build(self) -> None:
        build(self.prefix, self.state / "setup", nodes(), LINKS)
        self.start_tayga()

    def start_tayga(self, timeout: float = 10.0) -> subprocess.Popen[bytes]:
        """Tayga in the gateway: its TUN device with routes to the prefix and the pool, then
        tayga itself in the foreground; returns once it holds the device."""
        data = self.state / "tayga"
        data.mkdir(parents=True, exist_ok=True)
        conf = data / "tayga.conf"
        conf.write_text(TAYGA_CONF.format(tun=TUN, addr=TAYGA_ADDR, prefix=PREFIX6, pool=POOL, data=data))
        self.ns(self.gw, ["tayga", "-c", str(conf), "--mktun"])
        run(["ip", "-n", self.gw, "-batch", "-"],
            input=f"link set {TUN} up\nroute add {POOL} dev {TUN}\nroute add {PREFIX6} dev {TUN}\n")
        p = self.popen(self.gw, ["tayga", "-c", str(conf), "-d"], data / "tayga.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # NO-CARRIER until a process has the TUN device open
            if "NO-CARRIER" not in self.ns(self.gw, ["ip", "-o", "link", "show", TUN]).stdout:
                return p
            if p.poll() is not None:
                break
            time.sleep(0.05)
        raise LabError(f"tayga did not start in {self.gw}: {(data / 'tayga.log').read_text(errors='replace')}")


# ---- transfers with the lab's real clients ------------------------------------------------------
FILE = "small.txt"
UPLOAD = "upload-src.bin"
"""The file every upload sends (made by ``upload_source()`` in the lab's state directory)."""


@dataclass(frozen=True)
class Cell:
    """One transfer: ``client`` (an IPv6 kind) downloads ``FILE`` from server ``server`` or
    (``put``) uploads ``UPLOAD`` into its ``upload/`` directory."""

    client: clients.ClientKind
    server: str
    put: bool = False

    @property
    def label(self) -> str:
        return f"{self.client.label} {'upload to' if self.put else 'download from'} {self.server}"


def upload_source(lab: Nat64Lab, size: int = 300_000) -> Path:
    path = lab.state / UPLOAD
    if not path.exists():
        path.write_bytes(os.urandom(size))
    return path


def run_cell(lab: Nat64Lab, cell: Cell, tag: str, source: str = CLIENTS6[0], timeout: float = 15.0,
             name: str = FILE) -> tuple[bool, str]:
    """Run one transfer from ``source`` to the server's synthesised address; (whether the
    file arrived whole, by SHA-256; why not). ``tag`` keeps cells' files apart."""
    host = SERVERS6[cell.server]
    stem = f"{tag}-{cell.client.name}-{cell.client.mode}-{cell.server}"
    if cell.put:
        local = upload_source(lab)
        remote = f"upload/{stem}.bin"
        got = lab.files / remote
        argv = cell.client.upload_argv(host, local, remote, source=source)
        if argv is None:
            raise ValueError(f"{cell.client.label} cannot upload")
    else:
        local = lab.files / name
        got = lab.state / "transfers" / stem
        got.parent.mkdir(exist_ok=True)
        argv = cell.client.argv(host, name, got, source=source)
    got.unlink(missing_ok=True)
    try:
        p = lab.ns(lab.client, ["timeout", "-k", "1", str(timeout), *argv], check=False, timeout=timeout + 5)
        rc: int | None = None if p.returncode in (124, 137) else p.returncode
        text = p.stderr + p.stdout
    except Exception as e:  # a hung `ip netns exec`: a failed cell, never a crashed run
        rc, text = None, str(e)
    ok = rc == 0 and got.exists() and sha256(got) == sha256(local)
    detail = "ok" if ok else ("checksum mismatch" if rc == 0 else clients.failure_reason(text, rc, timeout))
    got.unlink(missing_ok=True)
    return ok, detail


def run_cells(lab: Nat64Lab, cells: list[Cell], tag: str, workers: int = 8,
              timeout: float = 15.0) -> dict[Cell, tuple[bool, str]]:
    """``run_cell`` for each cell, ``workers`` at a time."""
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(cells, pool.map(lambda c: run_cell(lab, c, tag, timeout=timeout), cells), strict=True))


def all_cells() -> list[Cell]:
    """Every IPv6 client kind against every server: a download, and an upload where the
    client can."""
    return [Cell(k, srv, put) for k in clients.kinds(family=6) for srv in SERVERS
            for put in (False, True) if k.uploads or not put]


def matrix_table(outcomes: dict[Cell, tuple[bool, str]]) -> list[str]:
    """Markdown: a row per client kind, a column per server; "get/put" per cell, each "ok",
    "FAIL" (a note below gives the reason) or "-" (cannot upload)."""
    notes: dict[str, int] = {}

    def mark(cell: Cell) -> str:
        if cell not in outcomes:
            return "-"
        ok, why = outcomes[cell]
        if ok:
            return "ok"
        why = re.sub(r"%\w+", "", why)  # an IPv6 scope id (pure-ftpd's message), different each time
        n = notes.setdefault(why, len(notes) + 1)
        return f"FAIL({n})"

    rows = sorted({c.client for c in outcomes}, key=lambda k: (clients.CLIENT_NAMES.index(k.name),
                                                               clients.MODES.index(k.mode)))
    lines = ["| client | " + " | ".join(SERVERS) + " |", "|---" * (len(SERVERS) + 1) + "|"]
    for k in rows:
        cells = [f"{mark(Cell(k, srv))} / {mark(Cell(k, srv, True))}" for srv in SERVERS]
        lines.append(f"| {k.label} | " + " | ".join(cells) + " |")
    lines += ["", *[f"- ({n}) {why}" for why, n in notes.items()]]
    return lines


def matrix(prefix: str, workers: int = 8) -> int:
    """Build the lab, run ``all_cells()`` without ftpalg, then with ``ftpalg run`` and
    ``NAT64_OPTIONS``, printing each table when done; remove the lab. 0 if every cell
    passed with ftpalg, which exited cleanly."""
    lab = Nat64Lab(prefix)
    t0 = time.monotonic()

    def show(title: str, outcomes: dict[Cell, tuple[bool, str]]) -> None:
        passed = sum(ok for ok, _ in outcomes.values())
        print(f"\n{title}: {passed}/{len(outcomes)} transfers pass (download / upload)\n")
        print("\n".join(matrix_table(outcomes)), flush=True)

    try:
        lab.up()
        todo = all_cells()
        show("without ftpalg", run_cells(lab, todo, "without", workers))
        p = lab.start_ftpalg(*NAT64_OPTIONS)
        try:
            with_ = run_cells(lab, todo, "with", workers)
        finally:
            rc = lab.stop_ftpalg(p)
        show(f"with `ftpalg run {' '.join(NAT64_OPTIONS)}`", with_)
    finally:
        lab.down()
    print(f"\nftpalg exit code {rc}; {time.monotonic() - t0:.0f} s in all")
    return 0 if rc == 0 and all(ok for ok, _ in with_.values()) else 1


# ---- a client of single commands ----------------------------------------------------------------
class _TalkFTP(ftplib.FTP):
    """ftplib over IPv6, its passive command (EPSV, or e.g. "EPSV 2") chosen per transfer."""

    passive_command = "EPSV"

    def makepasv(self) -> tuple[str, int]:
        assert self.sock is not None
        return ftplib.parse229(self.sendcmd(self.passive_command), self.sock.getpeername())


def talk(host: str, steps: list[str], source: str = "", timeout: float = 10.0) -> list[tuple[str, str]]:
    """Log in to ``host`` (IPv6) and run ``steps`` on one control connection: ``CMD text``
    sends a command and records its reply (an error reply too); ``GET name [COMMAND]``
    downloads in passive mode (``EPSV`` unless COMMAND, e.g. ``EPSV 2``, is given; the reply
    must be a 229) and records the SHA-256 of what arrived; ``PUT local remote`` uploads. A
    transfer that fails records ``ERROR reply``. Returns (step, result) pairs."""
    out = []
    ftp = _TalkFTP(timeout=timeout)
    try:
        ftp.connect(host, 21, source_address=(source, 0) if source else None)
        ftp.login()
        for step in steps:
            verb, _, arg = step.partition(" ")
            try:
                if verb == "CMD":
                    result = ftp.sendcmd(arg)
                elif verb == "GET":
                    name, _, command = arg.partition(" ")
                    ftp.passive_command = command or "EPSV"
                    h = hashlib.sha256()
                    ftp.retrbinary(f"RETR {name}", h.update)
                    result = h.hexdigest()
                elif verb == "PUT":
                    local, remote = arg.split(" ", 1)
                    with open(local, "rb") as f:
                        ftp.storbinary(f"STOR {remote}", f)
                    result = "stored"
                else:
                    raise ValueError(f"unknown step {step!r}")
            except ftplib.all_errors as e:
                result = str(e) if verb == "CMD" else f"ERROR {e}"
            out.append((step, result))
        ftp.quit()
    finally:
        ftp.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ftpalg.lab.nat64")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("talk", help="run steps on one control connection, print 'step<TAB>result'")
    t.add_argument("host")
    t.add_argument("steps", nargs="+", help="'CMD text', 'GET name' or 'PUT local remote'")
    t.add_argument("--source", default="")
    t.add_argument("--timeout", type=float, default=10.0)
    m = sub.add_parser("matrix", help="every client x server, without and with ftpalg (builds a lab; root)")
    m.add_argument("--prefix", default="ftpalg-nat64", help="name prefix of the lab's namespaces")
    args = ap.parse_args(argv)
    if args.cmd == "matrix":
        return matrix(args.prefix)
    try:
        for step, result in talk(args.host, args.steps, args.source, args.timeout):
            print(f"{step}\t{result}", flush=True)
    except (ftplib.Error, OSError, EOFError, ValueError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
