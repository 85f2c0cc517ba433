"""The lab's FTP servers (ftpalg/lab/servers.py), each kind on IPv4 and IPv6, without NAT:

    hs<pid>-c  192.0.2.1, 192.0.2.9     ──veth──  hs<pid>-s  192.0.2.10+i   fd00:99::10+i
               fd00:99::1, fd00:99::9                        (server kind i, port 21; its
                                                              pasv_address twin on port 2121)

Every instance runs at once. From the client namespace this file, run as a script (the
probe), downloads a file with PORT, EPRT, LPRT, PASV, EPSV and LPSV, uploads one, logs in as
"ftp", tries PORT/EPRT/LPRT to a foreign address (192.0.2.9 / fd00:99::9, where it listens) and
prints what happened as JSON; curl downloads and uploads as a real client does.

    python tests/test_lab_servers.py HOST PORT UPLOAD_NAME     (the probe; in the client namespace)
"""

from __future__ import annotations

import contextlib
import ftplib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ftpalg.lab.lab import add_namespaces, popen_in, teardown
from ftpalg.lab.servers import SERVER_KINDS, lpsv_reply, parse_lprt, server_command

CLIENT4, FOREIGN4 = "192.0.2.1", "192.0.2.9"
CLIENT6, FOREIGN6 = "fd00:99::1", "fd00:99::9"
MASQUERADE = "198.51.100.7"
FILE_SIZE = 1024 * 1024
netns = pytest.mark.netns
ACTIVE = ("PORT", "EPRT", "LPRT")
PASSIVE = ("PASV", "EPSV", "LPSV")
MODES = ACTIVE + PASSIVE


def server_addr(kind: str, family: int) -> str:
    i = SERVER_KINDS.index(kind)
    return f"192.0.2.{10 + i}" if family == 4 else f"fd00:99::{10 + i}"


# ---- the probe (runs in the client namespace) --------------------------------------------------

def _announce(mode: str, addr: str, port: int) -> str:
    if mode == "PORT":
        return f"{addr.replace('.', ',')},{port >> 8},{port & 0xFF}"
    if mode == "EPRT":
        return f"|{2 if ':' in addr else 1}|{addr}|{port}|"
    return lpsv_reply(addr, port).split("(")[1].rstrip(")")  # LPRT: 228's numbers


def _passive_target(reply: str, host: str) -> tuple[str, int]:
    if reply.startswith("227"):
        return ftplib.parse227(reply)
    if reply.startswith("229"):
        return ftplib.parse229(reply, (host, 0))
    m = re.search(r"\(([\d,]+)\)", reply)
    if not (reply.startswith("228") and m):
        raise ftplib.error_reply(reply)
    _, addr, port = parse_lprt(m.group(1))
    return addr, port


def _login(host: str, port: int, user: str = "anonymous") -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=5)
    # From the client's own address, never the foreign one (IPv6 could pick either).
    ftp.connect(host, port, source_address=(CLIENT6 if ":" in host else CLIENT4, 0))
    ftp.login(user, "lab@example.org")
    ftp.voidcmd("TYPE I")
    return ftp


def _transfer(host: str, port: int, mode: str, cmd: str, payload: bytes | None = None,
              announce: str | None = None, connect: bool = True) -> dict[str, Any]:
    """One data transfer in ``mode``: ``cmd`` is RETR (``payload`` None) or STOR.
    ``announce``: the address to announce in an active mode (default: the client's own).
    ``connect=False``: stop after the passive reply. Returns the replies, the passive
    target, the data's SHA-256 (downloads), the source port of an active data connection,
    whether the transfer completed ("ok") and the error, if any."""
    out: dict[str, Any] = {"reply": "", "ok": False}
    start = time.monotonic()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        try:
            ftp = _login(host, port)
            stack.callback(ftp.close)
            assert ftp.sock is not None
            local = ftp.sock.getsockname()[0]
            listener = None
            if mode in ACTIVE:
                listener = stack.enter_context(socket.create_server((announce or local, 0), family=family))
                listener.settimeout(3)
                out["reply"] = ftp.sendcmd(f"{mode} {_announce(mode, announce or local, listener.getsockname()[1])}")
            else:
                out["reply"] = ftp.sendcmd(mode)
                target = _passive_target(out["reply"], host)
                out["target"] = list(target)
                if not connect:
                    return out
            ftp.putcmd(cmd)
            if listener is not None:
                try:
                    data, peer = listener.accept()
                except TimeoutError:
                    out["transfer"] = "no connection: " + ftp.getline()
                    return out
                out["data_from"] = peer[1]
            else:
                data = socket.create_connection(target, timeout=5, source_address=(local, 0))
            stack.enter_context(data)
            out["transfer"] = ftp.getresp()
            if payload is None:
                h = hashlib.sha256()
                while chunk := data.recv(65536):
                    h.update(chunk)
                out["sha256"] = h.hexdigest()
            else:
                data.sendall(payload)
            data.close()
            out["transfer"] = ftp.voidresp()
            out["ok"] = True
            ftp.quit()
        except (ftplib.Error, OSError, EOFError) as e:
            out["error"] = f"{type(e).__name__}: {e}"
        finally:
            out["secs"] = round(time.monotonic() - start, 3)
    return out


def probe(host: str, port: int, upload: str) -> dict[str, Any]:
    """Everything the tests ask of one server instance (runs in the client namespace)."""
    foreign = FOREIGN6 if ":" in host else FOREIGN4
    res: dict[str, Any] = {m: _transfer(host, port, m, "RETR big.bin") for m in MODES}
    res["upload"] = _transfer(host, port, "EPSV", f"STOR upload/{upload}", payload=b"probe upload\n" * 1000)
    for mode in ACTIVE:
        res[f"foreign {mode}"] = _transfer(host, port, mode, "RETR big.bin", announce=foreign)
    for mode in ("PASV", "LPSV"):
        res[f"{mode} announces"] = _transfer(host, port, mode, "RETR big.bin", connect=False)
    try:
        ftp = _login(host, port, "ftp")
        res["login ftp"] = ftp.pwd()
        ftp.quit()
    except (ftplib.Error, OSError, EOFError) as e:
        res["login ftp"] = f"{type(e).__name__}: {e}"
    return res


# ---- the lab for this file -------------------------------------------------------------------

def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=check)


@dataclass
class Net:
    prefix: str
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hs-lab-")))
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    client: str = field(init=False)  # the namespaces: <prefix>-c, <prefix>-s
    server: str = field(init=False)

    def __post_init__(self) -> None:
        self.client, self.server = f"{self.prefix}-c", f"{self.prefix}-s"

    @property
    def files(self) -> Path:
        return self.root / "pub"

    def state(self, kind: str, family: int, pasv: bool = False) -> Path:
        return self.root / "state" / f"{kind}-{family}{'-pasv' if pasv else ''}"

    def up(self) -> None:
        c, s = self.client, self.server
        # The foreign IPv6 address is deprecated so that it is never a source address.
        addrs = {c: {"c0": [f"{CLIENT4}/24", f"{FOREIGN4}/24", f"{CLIENT6}/64", f"{FOREIGN6}/64 preferred_lft 0"]},
                 s: {"s0": [f"{server_addr(k, f)}/{24 if f == 4 else 64}" for k in SERVER_KINDS for f in (4, 6)]}}
        add_namespaces((c, s), [(c, "c0", s, "s0")], addrs)
        self.root.chmod(0o755)
        self.files.mkdir(mode=0o755)
        (self.files / "big.bin").write_bytes(os.urandom(FILE_SIZE))
        (self.files / "big.bin").chmod(0o644)
        up = self.files / "upload"
        up.mkdir()
        shutil.chown(up, "ftp", "ftp")
        up.chmod(0o755)

    def start(self, kind: str, family: int, port: int = 21, pasv_address: str | None = None) -> None:
        state = self.state(kind, family, pasv_address is not None)
        argv = server_command(kind, server_addr(kind, family), self.files, state, port, pasv_address)
        self.procs.append(popen_in(self.server, argv, Path(f"{state}.out")))

    def listening(self) -> set[str]:
        return set(run("ip", "netns", "exec", self.server, "ss", "-Hltn").stdout.split()[3::5])

    def wait_listening(self, want: set[str], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not want <= self.listening():
            dead = [p.args for p in self.procs if p.poll() is not None]
            assert not dead and time.monotonic() < deadline, (want - self.listening(), dead)
            time.sleep(0.05)

    def client_run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.client, *argv], capture_output=True, text=True,
                              timeout=timeout)

    def down(self) -> None:
        teardown(self.procs, (self.client, self.server), self.root)


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    net = Net(f"hs{os.getpid()}")
    try:
        net.up()
        want = set()
        for kind in SERVER_KINDS:
            for family in (4, 6):
                addr = server_addr(kind, family)
                net.start(kind, family)
                want.add(f"[{addr}]:21" if family == 6 else f"{addr}:21")
            net.start(kind, 4, 2121, MASQUERADE)
            want.add(f"{server_addr(kind, 4)}:2121")
        net.wait_listening(want)
        yield net
    finally:
        net.down()
    names = run("ip", "netns", "list").stdout
    assert net.client not in names and net.server not in names


@pytest.fixture(scope="module")
def probes(net: Net) -> dict[tuple[str, int | str], dict[str, Any]]:
    """The probe's results per (kind, 4 | 6 | "pasv"), all instances probed at once."""
    me = str(Path(__file__).resolve())
    jobs = {(k, f): (server_addr(k, f), 21) for k in SERVER_KINDS for f in (4, 6)}
    jobs.update({(k, "pasv"): (server_addr(k, 4), 2121) for k in SERVER_KINDS})

    def one(key: tuple[str, int | str]) -> dict[str, Any]:
        host, port = jobs[key]
        p = net.client_run(sys.executable, me, host, str(port), f"probe-{key[0]}-{key[1]}.bin")
        assert p.returncode == 0, p.stderr
        result: dict[str, Any] = json.loads(p.stdout)
        return result

    with ThreadPoolExecutor(len(jobs)) as pool:
        return dict(zip(jobs, pool.map(one, jobs), strict=True))


# ---- what each server does -------------------------------------------------------------------

# Modes that do not work, per address family; every other mode must. Only pyftpdlib (the
# lab's handler) knows LPRT and LPSV; the others answer 500. On IPv6 every server refuses
# PORT (5xx); PASV is refused by pure-ftpd (425) and answered with an unusable 227 by the
# others: vsftpd "(0,0,0,0,p1,p2)", proftpd "(p0,p1,p2)", pyftpdlib "(fd00:99::13,p1,p2)".
FAILS: dict[tuple[str, int], set[str]] = {
    ("vsftpd", 4): {"LPRT", "LPSV"},
    ("vsftpd", 6): {"PORT", "PASV", "LPRT", "LPSV"},
    ("proftpd", 4): {"LPRT", "LPSV"},
    ("proftpd", 6): {"PORT", "PASV", "LPRT", "LPSV"},
    ("pure-ftpd", 4): {"LPRT", "LPSV"},
    ("pure-ftpd", 6): {"PORT", "PASV", "LPRT", "LPSV"},
    ("pyftpdlib", 4): set(),
    ("pyftpdlib", 6): {"PORT", "PASV"},
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@netns
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_modes(net: Net, probes: dict[tuple[str, int | str], dict[str, Any]], kind: str, family: int) -> None:
    res = probes[kind, family]
    want = sha256(net.files / "big.bin")
    for mode in MODES:
        r = res[mode]
        if mode in FAILS[kind, family]:
            assert not r["ok"] and "data_from" not in r, (mode, r)
        else:
            assert r["ok"] and r["sha256"] == want, (mode, r)
        if mode in PASSIVE and r["ok"]:
            assert r["target"][0] == server_addr(kind, family), (mode, r)
    assert res["upload"]["ok"], res["upload"]
    assert (net.files / "upload" / f"probe-{kind}-{family}.bin").read_bytes() == b"probe upload\n" * 1000
    assert res["login ftp"] == "/"


@netns
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_no_port_to_a_foreign_address(probes: dict[tuple[str, int | str], dict[str, Any]],
                                      kind: str, family: int) -> None:
    """Default security kept: PORT/EPRT/LPRT naming another host is refused, nothing connects."""
    for mode in ACTIVE:
        r = probes[kind, family][f"foreign {mode}"]
        assert not r["ok"] and "data_from" not in r, (mode, r)


@netns
@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_pasv_address(probes: dict[tuple[str, int | str], dict[str, Any]], kind: str) -> None:
    """pasv_address changes the address in 227 (not what the server listens on); without it
    the server announces its own."""
    assert probes[kind, "pasv"]["PASV announces"]["target"][0] == MASQUERADE
    assert probes[kind, 4]["PASV announces"]["target"][0] == server_addr(kind, 4)
    if kind == "pyftpdlib":  # 228 too
        assert probes[kind, "pasv"]["LPSV announces"]["target"][0] == MASQUERADE
        assert probes[kind, 4]["LPSV announces"]["target"][0] == server_addr(kind, 4)


@netns
def test_exact_listen_addresses(net: Net) -> None:
    """One address per instance, never a wildcard."""
    listening = net.listening()
    assert not {a for a in listening if a.startswith(("0.0.0.0:", "*:", "[::]:"))}, listening


@netns
def test_curl(net: Net) -> None:
    """curl (a real client) in every mode it has, both families, and an upload."""
    want = sha256(net.files / "big.bin")
    jobs = []
    for kind in SERVER_KINDS:
        for family in (4, 6):
            host = server_addr(kind, family)
            url = f"ftp://[{host}]/big.bin" if family == 6 else f"ftp://{host}/big.bin"
            modes = {"EPSV": [], "EPRT": ["--ftp-port", "-"]}
            if family == 4:
                modes |= {"PASV": ["--disable-epsv"], "PORT": ["--ftp-port", "-", "--disable-eprt"]}
            for mode, opts in modes.items():
                out = net.root / f"curl-{kind}-{family}-{mode}"
                jobs.append((kind, family, mode, out, ["curl", "-sS", "--max-time", "10", *opts, "-o", str(out), url]))
            upload = url.replace("big.bin", f"upload/curl-{kind}-{family}.bin")
            jobs.append((kind, family, "STOR", None,
                         ["curl", "-sS", "--max-time", "10", "-T", str(net.files / "big.bin"), upload]))
    with ThreadPoolExecutor(len(jobs)) as pool:
        done = list(pool.map(lambda j: net.client_run(*j[4]), jobs))
    for (kind, family, mode, out, _), p in zip(jobs, done, strict=True):
        assert p.returncode == 0, (kind, family, mode, p.stderr)
        if out is not None:
            assert sha256(out) == want, (kind, family, mode)
    for kind in SERVER_KINDS:
        for family in (4, 6):
            assert sha256(net.files / "upload" / f"curl-{kind}-{family}.bin") == want


@netns
def test_state_files(net: Net) -> None:
    """What each server writes besides the files it serves is in its state directory."""
    state = net.root / "state"
    for family in (4, 6):
        assert {p.name for p in state.glob(f"proftpd-{family}/*")} >= {
            "proftpd.conf", "proftpd.pid", "proftpd.scoreboard", "proftpd.delay", "xferlog"}
        assert {p.name for p in state.glob(f"pure-ftpd-{family}/*")} >= {"pure-ftpd.pid", "pure-ftpd", "transfer.log"}
        assert {p.name for p in state.glob(f"vsftpd-{family}/*")} >= {"vsftpd.conf", "empty"}
    assert "/upload/probe-pure-ftpd-4.bin" in (state / "pure-ftpd-4" / "transfer.log").read_text()


def test_lprt_lpsv_helpers() -> None:
    assert parse_lprt("4,4,192,0,2,1,2,4,1") == (4, "192.0.2.1", 1025)
    assert parse_lprt("6,16,253,0,0,153,0,0,0,0,0,0,0,0,0,0,0,1,2,0,21") == (6, "fd00:99::1", 21)
    for bad in ("4,4,192,0,2,1,2,4", "4,4,192,0,2,256,2,4,1", "6,4,1,2,3,4,2,0,1", "4,4,1,2,3,4,3,0,0,1",
                "4, 4,1,2,3,4,2,0,1", "4,4,1_0,2,3,4,2,0,1", "", "4"):
        with pytest.raises(ValueError):
            parse_lprt(bad)
    assert lpsv_reply("192.0.2.1", 1025) == "228 Entering Long Passive Mode (4,4,192,0,2,1,2,4,1)"
    assert lpsv_reply("::ffff:192.0.2.1", 1025) == "228 Entering Long Passive Mode (4,4,192,0,2,1,2,4,1)"
    assert lpsv_reply("fd00:99::1", 21) == (
        "228 Entering Long Passive Mode (6,16,253,0,0,153,0,0,0,0,0,0,0,0,0,0,0,1,2,0,21)")


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], int(sys.argv[2]), sys.argv[3])))
