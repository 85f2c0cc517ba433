"""Every ClientKind against real servers, with a capture proving which command it sent.

Two namespaces of our own joined by a veth, no NAT, no ALG::

    hc<pid>-c  192.0.2.1  fd00:98::1  (+ one source address per job)
       c0 ── s0
    hc<pid>-s  192.0.2.2  fd00:98::2  vsftpd :21, pyftpdlib :2121 (IPv4 and IPv6)
               192.0.2.3  (pyftpdlib :2122 on 192.0.2.2 announces it in 227/228;
                           DNATed back to 192.0.2.2 inside hc<pid>-s)

The jobs (every kind x server x family it supports, downloads and uploads) run concurrently
(one at a time per pyftpdlib instance, see PARALLEL), each from a source address of its own,
under one tcpdump on s0; the capture is split per job by client address. For each job: exit
status and SHA-256, the one data-connection command sent (the mode's), and a data
connection to the address and port that command or its reply announced, from the job's
source address. Last, with data connections blackholed, every kind must fail in bounded time.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import select
import shutil
import struct
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from needs import need

from ftpalg.lab.clients import CLIENT_KINDS, MODES, TIMEOUT, ClientKind
from ftpalg.lab.lab import add_namespaces, netns_list, popen_in, teardown
from ftpalg.lab.servers import server_command

pytestmark = pytest.mark.netns

PREFIX = f"hc{os.getpid()}"
C4, S4, MASQ = "192.0.2.1", "192.0.2.2", "192.0.2.3"
C6, S6 = "fd00:98::1", "fd00:98::2"
PORTS = {"vsftpd": 21, "pyftpdlib": 2121}
MASQ_PORT = 2122
CONTROL_PORTS = {*PORTS.values(), MASQ_PORT}
# Jobs at once per server instance. pyftpdlib 2.2.0 loses sessions when several run at once
# in active mode: an ActiveDTP keeps the fd number it handed to the data connection and, when
# its control connection closes later, unregisters that number from the IO loop, which by
# then may be a new session's control connection: that session never hears from the server
# again (seen with strace: epoll_ctl(DEL) of a just-accepted fd; pyftpdlib PR #657).
PARALLEL = {"vsftpd": 8, "pyftpdlib": 1, "masq": 1}
FILE = "f.bin"
DATA_COMMANDS = set(MODES)


@dataclass(frozen=True)
class Job:
    kind: ClientKind
    server: str  # "vsftpd", "pyftpdlib" or "masq" (pyftpdlib announcing MASQ)
    v6: bool
    op: str  # "get" or "put"

    @property
    def id(self) -> str:
        return f"{self.kind.name}-{self.kind.mode}-{self.server}-v{6 if self.v6 else 4}-{self.op}"


def _jobs() -> list[Job]:
    jobs = []
    for k in CLIENT_KINDS:
        for server in PORTS:
            if 4 in k.families:
                jobs.append(Job(k, server, False, "get"))
            if 6 in k.families and k.mode not in ("PORT", "PASV"):
                jobs.append(Job(k, server, True, "get"))
            if k.uploads:  # over IPv4 where the kind can
                jobs.append(Job(k, server, 4 not in k.families, "put"))
        if k.mode in ("PASV", "LPSV") and 4 in k.families:
            jobs.append(Job(k, "masq", False, "get"))
    return jobs


JOBS = _jobs()
SOURCES = {j.id: (f"fd00:98::1:{i + 1:x}" if j.v6 else f"192.0.2.{100 + i}") for i, j in enumerate(JOBS)}
assert len(JOBS) < 150


# ---- a minimal pcap reader (Ethernet, IPv4/IPv6, TCP) ------------------------------------------
@dataclass
class Segment:
    src: str
    sport: int
    dst: str
    dport: int
    syn: bool
    ack: bool
    seq: int
    payload: bytes


def read_pcap(path: Path) -> list[Segment]:
    data = path.read_bytes()
    magic = data[:4]
    endian = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">", b"\x4d\x3c\xb2\xa1": "<",
              b"\xa1\xb2\x3c\x4d": ">"}[magic]
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    assert linktype == 1, f"linktype {linktype}"
    out, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[off + 8:off + 12])[0]
        frame, off = data[off + 16:off + 16 + incl], off + 16 + incl
        ethertype, ip = struct.unpack("!H", frame[12:14])[0], frame[14:]
        if ethertype == 0x0800 and len(ip) >= 20 and ip[9] == 6:
            ihl, total = (ip[0] & 15) * 4, struct.unpack("!H", ip[2:4])[0]
            src, dst = str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20]))
            tcp = ip[ihl:total]
        elif ethertype == 0x86DD and len(ip) >= 40 and ip[6] == 6:
            plen = struct.unpack("!H", ip[4:6])[0]
            src, dst = str(ipaddress.IPv6Address(ip[8:24])), str(ipaddress.IPv6Address(ip[24:40]))
            tcp = ip[40:40 + plen]
        else:
            continue
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        doff, flags = (tcp[12] >> 4) * 4, tcp[13]
        out.append(Segment(src, sport, dst, dport, bool(flags & 2), bool(flags & 16), seq, tcp[doff:]))
    return out


# ---- what one job did on the wire ------------------------------------------------------------
@dataclass
class Wire:
    commands: list[str] = field(default_factory=list)  # client -> server control lines
    replies: list[str] = field(default_factory=list)  # server -> client control lines
    syns: list[Segment] = field(default_factory=list)  # connection attempts other than control

    def data_commands(self) -> list[str]:
        return [c.split()[0].upper() for c in self.commands if c.split() and c.split()[0].upper() in DATA_COMMANDS]


def split_by_client(segments: list[Segment]) -> dict[str, Wire]:
    """Per client address: its control conversation(s) and its data connection attempts."""
    streams: dict[tuple[str, int, str, int], dict[int, bytes]] = {}
    wires: dict[str, Wire] = {}
    for s in segments:
        if s.syn and not s.ack and s.dport not in CONTROL_PORTS:
            client = s.dst if s.src in (S4, S6, MASQ) else s.src
            wires.setdefault(client, Wire()).syns.append(s)
        if s.payload and (s.dport in CONTROL_PORTS or s.sport in CONTROL_PORTS):
            streams.setdefault((s.src, s.sport, s.dst, s.dport), {}).setdefault(s.seq, s.payload)
    for (src, sport, dst, _dport), parts in streams.items():
        text = b"".join(parts[k] for k in sorted(parts)).decode("latin-1")
        lines = [line for line in text.split("\r\n") if line]
        if sport in CONTROL_PORTS:
            wires.setdefault(dst, Wire()).replies += lines
        else:
            wires.setdefault(src, Wire()).commands += lines
    return wires


def announced_port(wire: Wire, mode: str) -> tuple[str | None, int]:
    """(address or None, port) announced by the mode's command (active) or reply (passive)."""
    nums = re.compile(r"\d+(?:,\d+)+")
    if mode in ("PORT", "LPRT"):
        line = next(c for c in wire.commands if c.upper().startswith(mode))
        f = [int(x) for x in nums.findall(line)[0].split(",")]
        return None, f[-2] * 256 + f[-1]
    if mode == "EPRT":
        line = next(c for c in wire.commands if c.upper().startswith("EPRT"))
        return None, int(line.split(line[5])[3])
    code = {"PASV": "227", "EPSV": "229", "LPSV": "228"}[mode]
    line = next(r for r in wire.replies if r.startswith(code + " "))
    if mode == "EPSV":
        return None, int(re.search(r"\|\|\|(\d+)\|", line).group(1))  # type: ignore[union-attr]
    f = [int(x) for x in nums.findall(line[4:])[0].split(",")]
    if mode == "PASV":
        return ".".join(map(str, f[:4])), f[4] * 256 + f[5]
    hal = f[1]
    return str(ipaddress.ip_address(bytes(f[2:2 + hal]))), f[-2] * 256 + f[-1]


# ---- the namespaces ------------------------------------------------------------------------------
def sh(*argv: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(argv), capture_output=True, text=True, input=input, timeout=60)
    if check and p.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {p.stderr.strip()}")
    return p


def destroy(prefix: str, procs: list[subprocess.Popen[bytes]], *dirs: Path) -> None:
    teardown(procs, (f"{prefix}-c", f"{prefix}-s"), *dirs)


def remove_stale() -> None:
    """Namespaces left by an earlier run of this module that was killed (its pid is gone)."""
    for name in netns_list():
        m = re.fullmatch(r"(hc(\d+))-[cs]", name)
        if m and not os.path.exists(f"/proc/{m.group(2)}"):
            destroy(m.group(1), [])


@dataclass
class Net:
    dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def popen(self, ns: str, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        p = popen_in(ns, argv, self.dir / log)
        self.procs.append(p)
        return p

    def wait_listening(self, want: set[tuple[str, int]], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = sh("ip", "netns", "exec", f"{PREFIX}-s", "ss", "-Htln").stdout
            have = set()
            for line in out.splitlines():
                local = line.split()[3]
                addr, port = local.rsplit(":", 1)
                have.add((addr.strip("[]"), int(port)))
            if want <= have:
                return
            time.sleep(0.1)
        raise RuntimeError(f"servers not listening: {want - have}; logs in {self.dir}")

    def capture(self, pcap: Path) -> subprocess.Popen[bytes]:
        """tcpdump of every TCP segment on s0 (the servers' side) into ``pcap``, once it listens."""
        cap = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-s", "tcpdump", "--immediate-mode", "-U", "-n",
                                "-s", "300", "-i", "s0", "-w", str(pcap), "tcp"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self.procs.append(cap)
        assert cap.stderr is not None
        ready = select.select([cap.stderr], [], [], 10)[0]
        line = cap.stderr.readline() if ready else b""
        assert b"listening on" in line, line
        return cap

    @staticmethod
    def stop_capture(cap: subprocess.Popen[bytes]) -> None:
        time.sleep(0.5)  # the last packets to the file
        cap.terminate()
        cap.wait(10)


@pytest.fixture(scope="module")
def net():
    remove_stale()
    c, s = f"{PREFIX}-c", f"{PREFIX}-s"
    d = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
    d.chmod(0o755)
    n = Net(d)
    try:
        addrs = {c: {"c0": [f"{C4}/24", f"{C6}/64", *[f"{a}/{64 if ':' in a else 24}" for a in SOURCES.values()]]},
                 s: {"s0": [f"{S4}/24", f"{S6}/64", f"{MASQ}/32"]}}
        add_namespaces((c, s), [(c, "c0", s, "s0")], addrs)
        # The masquerading server's announced address leads back to it, inside its namespace.
        sh("ip", "netns", "exec", s, "iptables", "-t", "nat", "-A", "PREROUTING", "-d", MASQ, "-p", "tcp",
           "-j", "DNAT", "--to-destination", S4)
        root = d / "pub"
        (root / "upload").mkdir(parents=True)
        root.chmod(0o755)
        shutil.chown(root / "upload", "ftp", "ftp")
        (root / FILE).write_bytes(os.urandom(200_000))
        (root / FILE).chmod(0o644)
        want = set()
        for kind, port in PORTS.items():
            for addr in (S4, S6):
                n.popen(s, server_command(kind, addr, root, d / f"{kind}-{addr}", port=port), f"{kind}-{addr}.log")
                want.add((addr, port))
        n.popen(s, server_command("pyftpdlib", S4, root, d / "masq", port=MASQ_PORT, pasv_address=MASQ), "masq.log")
        want.add((S4, MASQ_PORT))
        n.wait_listening(want)
        yield n
    finally:
        destroy(PREFIX, n.procs, d)
        assert not {c, s} & netns_list()


@dataclass
class Result:
    job: Job
    proc: subprocess.CompletedProcess[str]
    path: Path  # the downloaded file, or the uploaded one as the server stored it
    original: Path
    wire: Wire


@pytest.fixture(scope="module")
def results(net: Net) -> dict[str, Result]:
    root = net.dir / "pub"
    pcap = net.dir / "all.pcap"
    cap = net.capture(pcap)

    def run(job: Job) -> tuple[Job, subprocess.CompletedProcess[str], Path]:
        host = S6 if job.v6 else S4
        port = MASQ_PORT if job.server == "masq" else PORTS[job.server]
        src = SOURCES[job.id]
        if job.op == "get":
            path = net.dir / f"{job.id}.out"
            argv = job.kind.argv(host, FILE, path, port=port, source=src)
        else:
            path = root / "upload" / f"{job.id}.bin"
            up = job.kind.upload_argv(host, root / FILE, f"upload/{job.id}.bin", port=port, source=src)
            assert up is not None
            argv = up
        try:
            p = subprocess.run(["ip", "netns", "exec", f"{PREFIX}-c", *argv], capture_output=True, text=True,
                               errors="replace", timeout=60, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            p = subprocess.CompletedProcess(e.cmd, -9, "", f"timed out after {e.timeout} s")
        return job, p, path

    groups: dict[tuple[str, bool], list[Job]] = {}
    for job in JOBS:
        groups.setdefault((job.server, job.v6), []).append(job)

    def run_group(jobs: list[Job]) -> list[tuple[Job, subprocess.CompletedProcess[str], Path]]:
        with ThreadPoolExecutor(max_workers=PARALLEL[jobs[0].server]) as pool:
            return list(pool.map(run, jobs))

    try:
        with ThreadPoolExecutor(max_workers=len(groups)) as pool:
            done = [r for group in pool.map(run_group, groups.values()) for r in group]
    finally:
        net.stop_capture(cap)
    wires = split_by_client(read_pcap(pcap))
    return {j.id: Result(j, p, path, root / FILE, wires.get(SOURCES[j.id], Wire())) for j, p, path in done}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"


def unsupported(r: Result) -> str | None:
    """Why the pyftpdlib server cannot do this mode (ftpalg.lab.servers without LPRT/LPSV),
    or None."""
    mode = r.job.kind.mode
    if mode in ("LPRT", "LPSV"):
        refused = [x for x in r.wire.replies if x.startswith("500 ") or x.startswith("502 ")]
        if refused and ("not understood" in refused[-1] or "nknown" in refused[-1]):
            return f"this pyftpdlib server has no {mode}: {refused[-1]}"
    return None


def check(r: Result) -> None:
    job, p, wire = r.job, r.proc, r.wire
    kind, src = job.kind, SOURCES[job.id]
    why = f"{job.id}: rc {p.returncode}\nstderr: {p.stderr[-1500:]}\nstdout: {p.stdout[-500:]}\nwire: {wire}"
    # The capture shows the mode's command, and only that one.
    assert wire.data_commands(), why
    assert set(wire.data_commands()) == {kind.mode}, why
    if job.server == "vsftpd" and kind.mode in ("LPRT", "LPSV"):  # vsftpd has neither: refused, failed
        assert p.returncode != 0 and any(x.startswith("500 ") for x in wire.replies), why
        return
    reason = unsupported(r)
    if reason:
        assert p.returncode != 0, why
    need(not reason, f"a lab pyftpdlib server with {kind.mode}: {reason} (the client did send it, and failed)")
    assert p.returncode == 0, why
    assert sha256(r.path) == sha256(r.original), why
    # A data connection to where the command (active) or the reply (passive) said.
    addr, port = announced_port(wire, kind.mode)
    server = S6 if job.v6 else S4
    if kind.active:
        assert any(s.dst == src and s.dport == port and s.src == server for s in wire.syns), why
    else:
        to = addr if kind.uses_reply_address and addr else server
        assert any(s.src == src and s.dst == to and s.dport == port for s in wire.syns), why


@pytest.mark.parametrize("job", [j for j in JOBS if j.server != "masq"], ids=lambda j: j.id)
def test_client_mode(results, job):
    check(results[job.id])


@pytest.mark.parametrize("job", [j for j in JOBS if j.server == "masq"], ids=lambda j: j.id)
def test_passive_reply_address(results, job):
    """A server announcing 192.0.2.3 (reachable, DNATed back to it) in 227/228: the kinds
    that use the reply's address connect there; tnftp refuses and fails."""
    r = results[job.id]
    if job.kind.uses_reply_address:
        check(r)
        assert any(s.dst == MASQ for s in r.wire.syns), r.wire
    else:
        assert r.proc.returncode != 0 and "Passive mode address mismatch" in r.proc.stdout + r.proc.stderr
        assert set(r.wire.data_commands()) == {job.kind.mode} and not r.wire.syns, r.wire


def test_every_kind_covered():
    assert {j.kind for j in JOBS} == set(CLIENT_KINDS)


def test_broken_data_connection_fails_in_bounded_time(net, results):
    """Data connections blackholed in the server's namespace (control still passes): every
    kind gets as far as its data connection (its one data-connection command, then an attempt
    to connect, on the wire) and gives up by itself, with a non-zero status, instead of
    hanging (killed after 3 * TIMEOUT seconds: a failure)."""
    s = f"{PREFIX}-s"
    rule = ["INPUT", "-p", "tcp", "-m", "multiport", "!", "--dports", ",".join(map(str, sorted(CONTROL_PORTS))),
            "-j", "DROP"]
    hung = 3 * TIMEOUT  # each kind gives up after about TIMEOUT

    def source(kind: ClientKind) -> tuple[str, str]:
        """(server, source): a source address of a job of this kind, in the family used here."""
        v6 = 4 not in kind.families
        return (S6 if v6 else S4), next(SOURCES[j.id] for j in JOBS if j.kind == kind and j.v6 == v6)

    def run(kind: ClientKind) -> tuple[ClientKind, subprocess.CompletedProcess[str]]:
        host, src = source(kind)
        out = net.dir / f"blackhole-{kind.name}-{kind.mode}"
        argv = ["ip", "netns", "exec", f"{PREFIX}-c", *kind.argv(host, FILE, out, port=PORTS["pyftpdlib"], source=src)]
        try:
            p = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=hung,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            p = subprocess.CompletedProcess(e.cmd, -9, "", f"hung: killed after {e.timeout} s")
        return kind, p

    pcap = net.dir / "blackhole.pcap"
    cap = net.capture(pcap)
    for tool in ("iptables", "ip6tables"):
        sh("ip", "netns", "exec", s, tool, "-I", *rule)
    try:
        with ThreadPoolExecutor(max_workers=len(CLIENT_KINDS)) as pool:
            done = list(pool.map(run, CLIENT_KINDS))
    finally:
        for tool in ("iptables", "ip6tables"):
            sh("ip", "netns", "exec", s, tool, "-D", *rule)
        net.stop_capture(cap)
    wires = split_by_client(read_pcap(pcap))
    wrong = []
    for kind, p in done:
        wire = wires.get(source(kind)[1], Wire())
        # failed by itself, after its mode's command (a fallback may follow) and an attempt to
        # connect to the port that command or its reply announced
        if (p.returncode in (0, -9) or wire.data_commands()[:1] != [kind.mode]
                or not any(s.dport == announced_port(wire, kind.mode)[1] for s in wire.syns)):
            wrong.append(f"{kind.label}: rc {p.returncode}\nstderr: {p.stderr[-800:]}\nwire: {wire}")
    assert not wrong, "\n\n".join(wrong)
