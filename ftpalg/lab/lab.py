"""A network-namespace lab: client(s) behind a NAT gateway, FTP servers outside.

    <p>-c  10.0.0.2, 10.0.0.3 ──veth── 10.0.0.1 <p>-gw 203.0.113.1 ──veth── 203.0.113.2 (vsftpd)
                                        MASQUERADE, FORWARD policy DROP      203.0.113.3 (pyftpdlib)

Everything lives in namespaces this module creates; nothing is added to the host's own
namespace. ``down()`` kills every process left in the namespaces, deletes them and the
lab's files. Not for production paths.
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
from dataclasses import dataclass, field
from pathlib import Path

from . import servers

CLIENT_NET = "10.0.0"
PUBLIC_NET = "203.0.113"
GW_INSIDE = f"{CLIENT_NET}.1"
GW_PUBLIC = f"{PUBLIC_NET}.1"
CLIENTS = (f"{CLIENT_NET}.2", f"{CLIENT_NET}.3")
SERVERS = {"vsftpd": f"{PUBLIC_NET}.2", "pyftpdlib": f"{PUBLIC_NET}.3"}
STATE_ROOT = Path("/run/ftpalg-lab")
FILE_SIZES = {"small.txt": 1000, "big.bin": 2 * 1024 * 1024}

FIREWALL = """*filter
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
-A POSTROUTING -o go -j MASQUERADE
COMMIT
"""



class LabError(RuntimeError):
    pass


def run(argv: list[str], check: bool = True, timeout: float = 60,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ftpalg_argv() -> list[str]:
    """How to start the CLI: the installed console script, as users run it."""
    script = Path(sys.executable).parent / "ftpalg"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ftpalg"]


@dataclass
class Lab:
    prefix: str = "ftpalg"
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def client(self) -> str:
        return f"{self.prefix}-c"

    @property
    def gw(self) -> str:
        return f"{self.prefix}-gw"

    @property
    def server(self) -> str:
        return f"{self.prefix}-s"

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.client, self.gw, self.server)

    @property
    def state(self) -> Path:
        return STATE_ROOT / self.prefix

    @property
    def files(self) -> Path:
        """Files every server offers (anonymous root)."""
        return self.state / "pub"

    def ns(self, name: str, argv: list[str], check: bool = True,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", name, *argv], check=check, timeout=timeout)

    def popen(self, name: str, argv: list[str], log: Path | None = None) -> subprocess.Popen[bytes]:
        with open(log or os.devnull, "ab") as out:
            p = subprocess.Popen(["ip", "netns", "exec", name, *argv], stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        return p

    # ---- topology ------------------------------------------------------------------------
    def up(self, servers: bool = True) -> None:
        self.down()
        try:
            self._topology()
            self._files()
            if servers:
                self.start_servers()
        except BaseException:
            self.down()
            raise

    def _topology(self) -> None:
        c, g, s = self.namespaces
        for n in self.namespaces:
            run(["ip", "netns", "add", n])
            self.ns(n, ["ip", "link", "set", "lo", "up"])
        run(["ip", "link", "add", "c0", "netns", c, "type", "veth", "peer", "gi", "netns", g])
        run(["ip", "link", "add", "go", "netns", g, "type", "veth", "peer", "s0", "netns", s])
        for n, dev, addrs in ((c, "c0", [f"{a}/24" for a in CLIENTS]), (g, "gi", [f"{GW_INSIDE}/24"]),
                              (g, "go", [f"{GW_PUBLIC}/24"]), (s, "s0", [f"{a}/24" for a in SERVERS.values()])):
            for a in addrs:
                self.ns(n, ["ip", "addr", "add", a, "dev", dev])
            self.ns(n, ["ip", "link", "set", dev, "up"])
        self.ns(c, ["ip", "route", "add", "default", "via", GW_INSIDE])
        self.ns(g, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        # The lab's firewall: stateful, DROP policy, no FTP helper anywhere.
        run(["ip", "netns", "exec", g, "iptables-restore"], input=FIREWALL)

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
        for kind, addr in SERVERS.items():
            argv = servers.server_command(kind, addr, self.files, self.state / kind)
            self.popen(self.server, argv, self.state / f"{kind}.out")
        for addr in SERVERS.values():
            self.wait_port(self.server, addr, 21)

    def wait_port(self, ns: str, addr: str, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        probe = f"import socket; socket.create_connection(('{addr}', {port}), 1).close()"
        while time.monotonic() < deadline:
            if self.ns(ns, [sys.executable, "-c", probe], check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise LabError(f"nothing listens on {addr}:{port} in {ns}")

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        self.procs.clear()
        existing = set(run(["ip", "netns", "list"]).stdout.split())
        for n in self.namespaces:
            if n not in existing:
                continue
            for _ in range(50):  # kill whatever still runs there (e.g. `ftpalg lab up` servers)
                pids = run(["ip", "netns", "pids", n], check=False).stdout.split()
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGTERM if _ < 10 else signal.SIGKILL)
                time.sleep(0.1)
            run(["ip", "netns", "del", n], check=False)
        shutil.rmtree(self.state, ignore_errors=True)
        with contextlib.suppress(OSError):
            STATE_ROOT.rmdir()

    def exists(self) -> bool:
        return self.gw in run(["ip", "netns", "list"]).stdout.split()

    # ---- inspection -----------------------------------------------------------------------
    def gw_rules(self) -> str:
        """iptables-save of the gateway, without counters."""
        return self.ns(self.gw, ["iptables-save"]).stdout

    def pinhole_rules(self) -> list[str]:
        return [line for line in self.gw_rules().splitlines()
                if line.startswith("-A FTPALG-PINHOLES")]

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

    # ---- ftpalg in the gateway -------------------------------------------------------------
    def start_ftpalg(self, *args: str, timeout: float = 15.0) -> subprocess.Popen[bytes]:
        """Start ``ftpalg run`` in the gateway namespace and wait until it is bound."""
        log = self.state / "ftpalg.log"
        log.write_bytes(b"")
        p = self.popen(self.gw, [*ftpalg_argv(), "run", "--log-level", "info", *args], log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"bound to NFQUEUE" in log.read_bytes():
                return p
            if p.poll() is not None:
                break
            time.sleep(0.05)
        self.stop_ftpalg(p)
        raise LabError(f"ftpalg did not start:\n{log.read_text()}")

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

    def ftpalg_log(self) -> str:
        path = self.state / "ftpalg.log"
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
