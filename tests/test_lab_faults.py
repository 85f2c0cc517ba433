"""Fault injection for the lab (ftpalg/lab/faults.py) on a plain link, no gateway::

    fq<pid>-c  c0  192.0.2.1  ──veth──  s0  192.0.2.2  fq<pid>-s

Under loss (the receiver's INPUT, after the capture point), duplication and reordering (the
sender's OUTPUT) a 2 MiB TCP transfer and an FTP session (pyftpdlib; downloads in passive and
active mode, an upload) arrive intact. A capture on the receiving veth shows exact copies (the
same IP ID and TCP header, checksum included, twice) and out-of-order arrivals: a segment
whose start was never seen before, below the highest sequence number seen (loss after the
capture point cannot make those: every retransmission repeats a start already captured). The
shuffler's counters are > 0, and afterwards each namespace's ruleset is as before and no
shuffler is left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ftpalg.lab import faults, servers
from ftpalg.lab.faults import FaultError, Faults, Shuffler
from ftpalg.lab.lab import add_namespaces, netns_list, remove_namespaces, teardown

pytestmark = pytest.mark.netns

CLIENT, SERVER = "192.0.2.1", "192.0.2.2"
BULK_PORT = 5001
SIZE = 2 * 1024 * 1024
STALE = re.compile(r"^fq(\d+)-(c|s)$")

RECEIVER = r"""
import hashlib, socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while b := c.recv(65536):
    h.update(b)
    n += len(b)
print(n, h.hexdigest(), flush=True)
"""
SENDER = r"""
import random, socket, sys
data = random.Random(int(sys.argv[3])).randbytes(int(sys.argv[4]))
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20) as s:
    s.sendall(data)
"""
FTP_CLIENT = r"""
import ftplib, hashlib, io, json, random, sys
host, seed, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {}
ftp = ftplib.FTP(timeout=20)
ftp.connect(host, 21)
ftp.login()
for passive in (True, False):
    ftp.set_pasv(passive)
    h = hashlib.sha256()
    ftp.retrbinary("RETR big.bin", h.update)
    out["pasv" if passive else "port"] = h.hexdigest()
ftp.set_pasv(True)
ftp.storbinary("STOR upload.bin", io.BytesIO(random.Random(seed).randbytes(size)))
ftp.quit()
print(json.dumps(out))
"""


def data(seed: int, size: int = SIZE) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass
class Pair:
    prefix: str
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ftpalg-faults-")))
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def client(self) -> str:
        return f"{self.prefix}-c"

    @property
    def server(self) -> str:
        return f"{self.prefix}-s"

    def up(self) -> None:
        add_namespaces([self.client, self.server], [(self.client, "c0", self.server, "s0")],
                       {self.client: {"c0": [f"{CLIENT}/24"]}, self.server: {"s0": [f"{SERVER}/24"]}})

    def down(self) -> None:
        teardown(self.procs, [self.client, self.server], self.tmp)

    def ns(self, name: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(["ip", "netns", "exec", name, *argv], capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, f"{argv}: {p.stderr}"
        return p

    def ruleset(self, name: str) -> str:
        return self.ns(name, "nft", "-s", "list", "ruleset").stdout

    def shufflers(self) -> list[str]:
        """Command lines of shuffler processes in either namespace."""
        out = []
        for name in (self.client, self.server):
            for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
                with contextlib.suppress(OSError):
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    if "ftpalg.lab.faults" in cmd:
                        out.append(cmd)
        return out

    @contextlib.contextmanager
    def capture(self, name: str, dev: str, path: Path, bpf: str) -> Iterator[None]:
        """tcpdump on ``dev``: headers only (-s 200) into a 16 MiB buffer, which with
        --immediate-mode loses nothing here (the default 2 MiB lost ~10 % of a bulk
        transfer); asserts that the kernel dropped none."""
        argv = ["ip", "netns", "exec", name, "tcpdump", "--immediate-mode", "-U", "-n", "-B", "16384", "-s", "200",
                "-i", dev, "-w", str(path), bpf]
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert p.stderr is not None
        try:
            line = p.stderr.readline() if select.select([p.stderr], [], [], 10)[0] else b""
            assert b"listening on" in line, line
            yield
            time.sleep(0.3)  # the last packets reach the file
        finally:
            p.terminate()
            err = p.communicate(timeout=10)[1].decode()
        assert re.search(r"^0 packets dropped by kernel", err, re.M), err


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    for m in filter(None, map(STALE.match, netns_list())):  # left by a killed run
        if not os.path.exists(f"/proc/{m.group(1)}"):
            remove_namespaces([m.group(0)])
    p = Pair(f"fq{os.getpid()}")
    try:
        p.up()
        yield p
    finally:
        p.down()
    assert not {p.client, p.server} & netns_list()


# ---- the capture -----------------------------------------------------------------------------------
@dataclass
class Flows:
    segments: int = 0  # with payload
    copies: int = 0  # the same IP ID and TCP header (with its checksum) again
    out_of_order: int = 0  # a start never seen before, below the highest sequence number seen
    flows: int = 0


def analyse(pcap: Path, src: str, sport: int | None = None) -> Flows:
    """Data segments from ``src`` (``sport``: only those from that port), per connection."""
    from scapy.layers.inet import IP, TCP
    from scapy.utils import rdpcap

    out = Flows()
    state: dict[tuple[int, str, int], tuple[int, set[tuple[int, bytes]], set[int], int]] = {}
    for pkt in rdpcap(str(pcap)):
        if IP not in pkt or TCP not in pkt or pkt[IP].src != src:
            continue
        ip, tcp = pkt[IP], pkt[TCP]
        if sport is not None and tcp.sport != sport:
            continue
        n = ip.len - 4 * ip.ihl - 4 * tcp.dataofs  # the capture holds headers only
        key = (tcp.sport, ip.dst, tcp.dport)
        if key not in state:
            state[key] = (tcp.seq, set(), set(), 0)  # relative sequence numbers: no wrap
            out.flows += 1
        isn, seen, starts, top = state[key]
        if not n:
            continue
        out.segments += 1
        ident = (ip.id, bytes(tcp)[: 4 * tcp.dataofs])  # seq, ack, window, checksum, options
        if ident in seen:
            out.copies += 1
            continue
        seen.add(ident)
        rel = (tcp.seq - isn) % 2**32
        if rel not in starts and rel < top:
            out.out_of_order += 1
        starts.add(rel)
        state[key] = (isn, seen, starts, max(top, rel + n))
    return out


def drop_count(pair: Pair, name: str) -> int:
    """Packets the loss rules in ``name`` dropped so far."""
    text = pair.ns(name, "nft", "list", "ruleset").stdout
    return sum(int(m.group(1)) for m in re.finditer(r"meta random .* counter packets (\d+) bytes \d+ drop", text))


# ---- tests ---------------------------------------------------------------------------------------------
def test_bulk_transfer(pair: Pair) -> None:
    before = {n: pair.ruleset(n) for n in (pair.client, pair.server)}
    pcap = pair.tmp / "bulk.pcap"
    receiver = subprocess.Popen(["ip", "netns", "exec", pair.server, sys.executable, "-c", RECEIVER, SERVER,
                                 str(BULK_PORT)], stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
        with contextlib.ExitStack() as stack:
            stack.enter_context(pair.capture(pair.server, "s0", pcap, f"tcp port {BULK_PORT}"))
            loss = stack.enter_context(Faults(pair.server, chain="INPUT", in_dev="s0", loss=0.02,
                                              ports=(BULK_PORT,)))
            shuffle = stack.enter_context(Faults(pair.client, chain="OUTPUT", out_dev="c0", dup=0.03, reorder=0.05,
                                                 delay_ms=10, ports=(BULK_PORT,), seed=1, queue=3101))
            assert loss.proc is None and shuffle.proc is not None  # loss alone needs no process
            start = time.monotonic()
            pair.ns(pair.client, sys.executable, "-c", SENDER, SERVER, str(BULK_PORT), "1", str(SIZE))
            got = receiver.communicate(timeout=30)[0].split()
            secs = time.monotonic() - start
            dropped = drop_count(pair, pair.server)
    finally:
        receiver.kill()
        receiver.wait()
    assert got == [str(SIZE), hashlib.sha256(data(1)).hexdigest()]
    flows = analyse(pcap, CLIENT)
    c = shuffle.counters
    print(f"bulk: {secs:.2f} s, loss rule dropped {dropped}, shuffler {c}, capture {flows}")
    assert dropped > 0
    assert c["seen"] > 1000 and c["duplicated"] > 0 and c["reordered"] > 0 and c["copy_errors"] == 0
    # every copy and every out-of-order start in the capture is the shuffler's doing: a copy
    # of a data segment, a held segment that was overtaken (or its retransmission, if that
    # came first); copies of segments without data are not counted
    assert 0 < flows.copies <= c["duplicated"] and 0 < flows.out_of_order <= c["reordered"]
    assert loss.counters == {}
    assert {n: pair.ruleset(n) for n in before} == before
    assert not pair.shufflers()


def test_ftp_session(pair: Pair) -> None:
    before = {n: pair.ruleset(n) for n in (pair.client, pair.server)}
    root, state = pair.tmp / "root", pair.tmp / "state"
    root.mkdir()
    (root / "big.bin").write_bytes(data(2))
    pcap = pair.tmp / "ftp.pcap"
    argv = servers.server_command("pyftpdlib", SERVER, root, state)
    with open(pair.tmp / "pyftpdlib.log", "ab") as log:
        server = subprocess.Popen(["ip", "netns", "exec", pair.server, *argv], stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    pair.procs.append(server)
    deadline = time.monotonic() + 10
    while f"{SERVER}:21" not in pair.ns(pair.server, "ss", "-Hltn").stdout:
        assert time.monotonic() < deadline and server.poll() is None, (pair.tmp / "pyftpdlib.log").read_text()
        time.sleep(0.05)
    fs: dict[str, Faults] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(pair.capture(pair.client, "c0", pcap, "tcp"))
        for name, dev, peer in ((pair.client, "c0", "client"), (pair.server, "s0", "server")):
            stack.enter_context(Faults(name, chain="INPUT", in_dev=dev, loss=0.02))
            fs[peer] = stack.enter_context(Faults(name, chain="OUTPUT", out_dev=dev, dup=0.03, reorder=0.05,
                                                  delay_ms=10, seed=3))
        start = time.monotonic()
        out = json.loads(pair.ns(pair.client, sys.executable, "-c", FTP_CLIENT, SERVER, "4", str(SIZE // 2)).stdout)
        secs = time.monotonic() - start
    want = hashlib.sha256(data(2)).hexdigest()
    assert out == {"pasv": want, "port": want}
    assert (root / "upload.bin").read_bytes() == data(4, SIZE // 2)
    flows = analyse(pcap, SERVER)
    counters = {peer: f.counters for peer, f in fs.items()}
    print(f"ftp: {secs:.2f} s, shufflers {counters}, capture (server -> client) {flows}")
    assert flows.flows >= 3  # control, passive data, active data
    assert flows.copies > 0 and flows.out_of_order > 0
    for c in counters.values():
        assert c["duplicated"] > 0 and c["reordered"] > 0 and c["copy_errors"] == 0
    assert {n: pair.ruleset(n) for n in before} == before
    assert not pair.shufflers()


def test_cleanup_on_exception(pair: Pair) -> None:
    before = pair.ruleset(pair.server)
    with pytest.raises(RuntimeError, match="boom"), Faults(pair.server, chain="FORWARD", in_dev="s0", loss=0.1,
                                                           drop=0.1, families=(4, 6), table="mangle"):
        assert pair.shufflers()
        assert "queue num" in pair.ruleset(pair.server) and "ip6 mangle" in pair.ruleset(pair.server)
        raise RuntimeError("boom")
    assert pair.ruleset(pair.server) == before
    assert not pair.shufflers()


def test_refusals(pair: Pair) -> None:
    with pytest.raises(FaultError, match="no network namespace"):
        Faults(f"{pair.prefix}-nonexistent", loss=0.1).start()
    with pytest.raises(ValueError):
        Faults(pair.server, chain="PREROUTING", loss=0.1)  # not in the security table
    with pytest.raises(ValueError):
        Faults(pair.server, chain="INPUT", out_dev="s0", loss=0.1)
    with pytest.raises(ValueError):
        Faults(pair.server, dup=1.5)
    # the command refuses the host's namespace (where this test runs)
    p = subprocess.run([sys.executable, "-m", "ftpalg.lab.faults", "shuffle", "--chain", "INPUT", "--dup", "0.1"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "host's network namespace" in p.stderr
    # a queue already bound: the second shuffler fails to start, and leaves nothing behind
    before = pair.ruleset(pair.server)
    with Faults(pair.server, dup=0.1, queue=3102), pytest.raises(FaultError, match="did not bind"):
        Faults(pair.server, dup=0.1, queue=3102, timeout=5).start()
    assert pair.ruleset(pair.server) == before
    assert not pair.shufflers()


# ---- the shuffler's decisions, with stand-in packets ------------------------------------------------
class FakePacket:
    def __init__(self, log: list[tuple[str, int]], n: int) -> None:
        self.log, self.n = log, n

    def get_payload(self) -> bytes:
        return bytes([0x45]) + self.n.to_bytes(4, "big")

    def retain(self) -> None:
        pass

    def accept(self) -> None:
        self.log.append(("accept", self.n))

    def drop(self) -> None:
        self.log.append(("drop", self.n))


def run_fake(seed: int, count: int = 2000, **kw: Any) -> tuple[list[tuple[str, int]], dict[str, int], int]:
    log: list[tuple[str, int]] = []
    s = Shuffler(0, seed=seed, **kw)
    s.send_copy = lambda d: (log.append(("copy", int.from_bytes(d[1:5], "big"))),  # type: ignore[method-assign]
                             s.counters.__setitem__("duplicated", s.counters["duplicated"] + 1))
    most = 0
    for i in range(count):
        s.on_packet(FakePacket(log, i))
        most = max(most, len(s.held))
    s.closing = True
    s.release_all()
    return log, s.counters, most


def test_shuffler_decisions() -> None:
    kw = {"dup": 0.05, "reorder": 0.1, "drop": 0.02, "delay_ms": 1e6, "max_held": 4}
    log, c, most = run_fake(7, **kw)
    assert (log, c) == run_fake(7, **kw)[:2]  # the seed fixes every decision
    assert run_fake(8, **kw)[0] != log
    assert most == 4  # never more than max_held
    verdicts = [n for what, n in log if what in ("accept", "drop")]
    assert sorted(verdicts) == list(range(2000))  # every packet gets exactly one verdict
    assert verdicts != sorted(verdicts)
    assert c["seen"] == 2000 and c["passed"] + c["dropped"] == 2000
    assert c["duplicated"] == sum(what == "copy" for what, _ in log) > 0
    assert c["held"] >= c["reordered"] > 0 and c["dropped"] > 0
    assert all(log[i - 1] == ("accept", n) for i, (what, n) in enumerate(log) if what == "copy")  # copy after it
    # a short delay: held packets go when their time is up, not only when the queue is full
    s = Shuffler(0, reorder=1.0, delay_ms=1, max_held=100)
    held: list[tuple[str, int]] = []
    s.on_packet(FakePacket(held, 0))
    time.sleep(0.01)
    s.release(time.monotonic())
    assert held == [("accept", 0)] and not s.held and tuple(s.counters) == faults.COUNTER_NAMES

