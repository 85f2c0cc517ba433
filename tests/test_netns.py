"""End-to-end tests in network namespaces: real kernel NAT and conntrack, a DROP-policy
firewall on the gateway, real vsftpd/pyftpdlib servers, real curl/lftp/ftplib clients."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Packet
from scapy.utils import rdpcap

from ftpalg.lab.lab import (
    CLIENT_KINDS,
    CLIENTS,
    GW_PUBLIC,
    OUTSIDE_CLIENTS,
    PUBLIC_OF,
    SERVERS,
    Lab,
    ftpalg_argv,
    sha256,
)
from netns_checks import no_pinholes_soon

pytestmark = pytest.mark.netns


@pytest.fixture
def alg(lab):
    """ftpalg run (no options) in the gateway for one test; checks it cleaned up."""
    before = lab.ruleset()
    p = lab.start_ftpalg()
    yield p
    rc = lab.stop_ftpalg(p)
    assert rc == 0, lab.ftpalg_log()
    assert lab.ruleset() == before  # exactly as found, tables made on demand included
    assert "Traceback" not in lab.ftpalg_log()


def load_deploy_files(lab: Lab) -> None:
    """What docs/deploying.md tells an admin who uses --no-rules to load."""
    deploy = Path(__file__).resolve().parent.parent / "deploy"
    lab.ns(lab.gw, ["nft", "-f", str(deploy / "ftpalg.nft")])
    for restore in ("iptables-restore", "ip6tables-restore"):
        subprocess.run(["ip", "netns", "exec", lab.gw, restore, "--noflush"],
                       input=(deploy / "queue.iptables").read_text(), text=True, check=True)


def remove_static_rules(lab: Lab) -> None:
    code = "from ftpalg.linux.rules import StaticRules; StaticRules([21], 0).remove()"
    lab.ns(lab.gw, [sys.executable, "-c", code])


def ns_python(lab: Lab, ns: str, code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return lab.ns(ns, [sys.executable, "-c", textwrap.dedent(code)], check=False, timeout=timeout)


CONTROL_AND_SYNS = "tcp port 21 or tcp[tcpflags] & tcp-syn != 0"
"""tcpdump's filter for control segments and every connection's SYN and SYN-ACK."""


class Capture:
    """tcpdump of the control port on the server's interface (what crossed the wire), or
    on ``dev`` in ``ns`` with ``bpf``."""

    def __init__(self, lab: Lab, name: str, ns: str | None = None, dev: str = "s0",
                 bpf: str = "tcp port 21") -> None:
        self.path = lab.state / f"{name}.pcap"
        self.proc = lab.capture(lab.server if ns is None else ns, dev, self.path, bpf)

    def stop(self) -> list[bytes]:
        Lab.stop_capture(self.proc)
        return [bytes(p[TCP].payload) for p in self.packets() if bytes(p[TCP].payload)]

    def packets(self) -> list[Packet]:
        return [p for p in rdpcap(str(self.path)) if IP in p and TCP in p]


def commands(payloads: list[bytes], verb: bytes) -> list[bytes]:
    return [line.strip() for p in payloads for line in p.splitlines() if line.upper().startswith(verb)]


ANNOUNCEMENTS = (b"PORT ", b"EPRT ", b"227 ", b"229 ")


def announcements(packets: list[Packet]) -> list[str]:
    """The PORT and EPRT commands and 227 and 229 replies on the control port, in order (a
    retransmitted segment counted once)."""
    out, done = [], set()
    for p in packets:
        key = (p[IP].src, p[TCP].sport, p[TCP].seq)
        if 21 in (p[TCP].sport, p[TCP].dport) and bytes(p[TCP].payload) and key not in done:
            done.add(key)
            out += [line.strip().decode() for line in bytes(p[TCP].payload).splitlines()
                    if line.upper().startswith(ANNOUNCEMENTS)]
    return out


def data_ports(packets: list[Packet]) -> list[int]:
    """The destination port of each connection other than to port 21 whose SYN was answered
    (SYN-ACK), in order: the data connections that were let through and got somewhere."""
    answered = {(p[IP].dst, p[TCP].dport, p[IP].src, p[TCP].sport) for p in packets if p[TCP].flags == "SA"}
    out, done = [], set()
    for p in packets:
        key = (p[IP].src, p[TCP].sport, p[IP].dst, p[TCP].dport)
        if p[TCP].flags == "S" and p[TCP].dport != 21 and key in answered and key not in done:
            done.add(key)
            out.append(p[TCP].dport)
    return out


_PORT_FIELD = re.compile(r"(\d+,\d+,\d+,\d+),(\d+),(\d+)|\|(\d+)\|(?!.*\|)")


def split_port(text: str) -> tuple[str, int]:
    """(the text with its port replaced by ``<port>``, the port) of a PORT, EPRT, 227 or 229."""
    m = _PORT_FIELD.search(text)
    assert m is not None, text
    if m.group(1):
        return f"{text[:m.start()]}{m.group(1)},<port>{text[m.end():]}", int(m.group(2)) * 256 + int(m.group(3))
    return f"{text[:m.start()]}|<port>|{text[m.end():]}", int(m.group(4))


@dataclass(frozen=True)
class Seen:
    """One run of a scenario on the wire: the announcements (PORT, EPRT, 227, 229) as the
    party behind the gateway sent them and as the other end received them, in order, and the
    port of each data connection that was answered."""

    sent: list[str]
    received: list[str]
    data_ports: list[int]

    @classmethod
    def of(cls, sent: Capture, received: Capture) -> Seen:
        return cls(announcements(sent.packets()), announcements(received.packets()), data_ports(received.packets()))

    @classmethod
    def received_at(cls, received: Capture) -> Seen:
        """Only what the other end received (nothing of what was sent)."""
        return cls([], announcements(received.packets()), data_ports(received.packets()))


def test_lab_breaks_active_mode_without_ftpalg(lab, tmp_path):
    """The baseline that makes the other tests meaningful: NAT breaks active mode here."""
    for server in SERVERS:
        p = lab.transfer(CLIENT_KINDS[3], server, "small.txt", tmp_path / "out")
        assert p.returncode != 0
        # each server words its refusal of a private address differently
        assert any(why in p.stderr for why in ("Illegal PORT", "foreign address", "425", "won't open")), p.stderr
    assert "FTPALG" not in lab.gw_rules()
    helper = Path("/proc/sys/net/netfilter/nf_conntrack_helper")
    assert "--helper" not in lab.gw_rules()
    if helper.exists():
        assert helper.read_text().strip() == "0"


@pytest.mark.parametrize("server", list(SERVERS))
@pytest.mark.parametrize("kind", CLIENT_KINDS, ids=lambda k: k.label.replace(" ", "-"))
def test_download(lab, alg, tmp_path, server, kind):
    cap = Capture(lab, f"dl-{server}-{kind.name}-{kind.form}")
    out = lab.state / "download"
    out.unlink(missing_ok=True)
    p = lab.transfer(kind, server, "big.bin", out)
    wire = cap.stop()
    assert p.returncode == 0, p.stderr[-2000:]
    assert sha256(out) == sha256(lab.files / "big.bin")
    announced = commands(wire, kind.form.encode())
    assert announced, wire
    pub = GW_PUBLIC.replace(".", ",").encode() if kind.form == "PORT" else GW_PUBLIC.encode()
    assert all(pub in c for c in announced)  # the server saw the public address only
    assert not any(b"10,0,0" in c or b"10.0.0" in c for c in announced)
    assert no_pinholes_soon(lab)  # nothing survives the session


@pytest.mark.parametrize("server", list(SERVERS))
def test_upload(lab, alg, tmp_path, server):
    src = lab.state / "upload-src"
    src.write_bytes(os.urandom(300_000))
    name = f"upload/up-{server}.bin"
    p = lab.ns(lab.client, [sys.executable, "-m", "ftpalg.lab.ftpclient", SERVERS[server], "put", str(src), name],
               check=False)
    assert p.returncode == 0, p.stderr
    assert sha256(lab.files / name) == sha256(src)


def test_pinhole_exists_only_between_port_and_transfer(lab, alg):
    code = f"""
        import ftplib, socket, subprocess
        ftp = ftplib.FTP(timeout=10)
        ftp.connect("{SERVERS['vsftpd']}", 21)
        ftp.login()
        ls = socket.create_server(("{CLIENTS[0]}", 45678))
        ftp.sendport("{CLIENTS[0]}", 45678)
        print("PORT-SENT", flush=True)
        input()
        ftp.sendcmd("TYPE I")
        conn = None
        ftp.putcmd("RETR small.txt")
        print(ftp.getresp())
        c, _ = ls.accept()
        while c.recv(65536):
            pass
        c.close()
        print(ftp.voidresp(), flush=True)
        input()
        ftp.quit()
    """
    p = subprocess.Popen(["ip", "netns", "exec", lab.client, sys.executable, "-c", textwrap.dedent(code)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "PORT-SENT"
        time.sleep(0.3)
        (exp,) = lab.expectations()  # one expectation of the control connection
        assert f"src={SERVERS['vsftpd']} dst={GW_PUBLIC} sport=0 dport=45678" in exp, exp  # the real server only
        assert f"master-src={CLIENTS[0]}" in exp and "helper=sane" in exp
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().startswith("150")
        assert p.stdout.readline().startswith("226")
        assert no_pinholes_soon(lab)
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.wait(10) == 0
    finally:
        p.kill()


def test_bounce_opens_nothing(lab, alg):
    res = ns_python(lab, lab.client, f"""
        import ftplib
        ftp = ftplib.FTP("{SERVERS['pyftpdlib']}", timeout=10)
        ftp.login()
        try:
            ftp.sendport("{SERVERS['vsftpd']}", 21)
        except ftplib.error_perm as e:
            print(e)
        ftp.quit()
    """)
    assert "foreign address" in res.stdout
    assert lab.expectations() == []  # never opened, not merely closed
    time.sleep(0.2)
    assert "refused" in lab.ftpalg_log() and "FTP bounce" in lab.ftpalg_log()


COLLIDE_CLIENT = r"""
import ftplib, hashlib, socket, sys
server, sources = sys.argv[1], sys.argv[2:]
conns = []
for src in sources:  # every client announces port 40000, all before any transfer
    ftp = ftplib.FTP(timeout=10)
    ftp.connect(server, 21, source_address=(src, 0))
    ftp.login()
    ftp.voidcmd("TYPE I")
    ls = socket.create_server((src, 40000))
    ftp.sendport(src, 40000)
    conns.append((ftp, ls))
for ftp, ls in conns:
    ftp.putcmd("RETR small.txt")
    ftp.getresp()
    c, _ = ls.accept()
    data = b""
    while chunk := c.recv(65536):
        data += chunk
    c.close()
    ftp.voidresp()
    print(hashlib.sha256(data).hexdigest())
    ftp.quit()
"""


def collide(lab: Lab) -> subprocess.CompletedProcess[str]:
    return lab.ns(lab.client, [sys.executable, "-c", COLLIDE_CLIENT, SERVERS["vsftpd"], *CLIENTS], check=False)


def test_busy_public_port_is_replaced(lab, alg):
    """Two inside clients announce the same port to the same server at the same time: the
    second gets another public port, and both transfers work, each over the port announced."""
    cap = Capture(lab, "collide", bpf=CONTROL_AND_SYNS)
    res = collide(lab)
    cap.stop()
    check_collision(Seen.received_at(cap))  # before the transfers' outcome: it says which port failed
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [sha256(lab.files / "small.txt")] * 2


def check_collision(seen: Seen) -> None:
    """One client keeps port 40000; the other gets another (nf_nat_ftp: a random higher one),
    at the public address: the port its data connection then really used."""
    assert len(seen.received) == 2 and seen.received[0] == "PORT 203,0,113,1,156,64", seen
    text, port = split_port(seen.received[1])
    assert text == "PORT 203,0,113,1,<port>" and port != 40000, seen
    assert seen.data_ports == [40000, port], seen  # each over the port announced, in that order


def test_fifty_concurrent_sessions(lab, alg):
    res = ns_python(lab, lab.client, f"""
        import hashlib, sys, threading
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from ftpalg.lab.ftpclient import ActiveFTP
        results = []
        def one(i):
            host = {SERVERS['vsftpd']!r} if i % 2 else {SERVERS['pyftpdlib']!r}
            try:
                ftp = ActiveFTP(eprt=bool(i % 3 == 0), data_port=0, timeout=60)
                ftp.connect(host, 21)
                ftp.login()
                barrier.wait()
                h = hashlib.sha256()
                ftp.retrbinary("RETR big.bin", h.update)
                ftp.quit()
                results.append(h.hexdigest())
            except Exception as e:
                results.append(repr(e))
        barrier = threading.Barrier(50, timeout=60)
        ts = [threading.Thread(target=one, args=(i,)) for i in range(50)]
        for t in ts: t.start()
        for t in ts: t.join()
        print("\\n".join(results))
    """, timeout=300)
    assert res.returncode == 0, res.stderr
    want = sha256(lab.files / "big.bin")
    got = res.stdout.split("\n")[:50]
    assert got == [want] * 50, [g for g in got if g != want][:5]
    assert lab.ftpalg_log().count("pinhole open") == 50  # every session was active mode
    assert no_pinholes_soon(lab)


def test_run_cleans_up_on_sigint_and_sigterm(lab):
    before = lab.ruleset()
    for sig in ("INT", "TERM"):
        p = lab.start_ftpalg()
        assert "FTPALG-QUEUE" in lab.gw_rules() and "FTPALG-QUEUE" in lab.gw_rules6()
        assert "table inet ftpalg" in lab.ruleset()
        p.send_signal(getattr(__import__("signal"), f"SIG{sig}"))
        assert p.wait(10) == 0
        lab.procs.remove(p)
        assert lab.ruleset() == before


def test_control_traffic_passes_when_ftpalg_is_not_running(lab, tmp_path):
    """Queue bypass: with the rules loaded (deploy/ files, --no-rules) but no process bound,
    control packets pass unchanged (passive mode keeps working)."""
    load_deploy_files(lab)
    try:
        out = tmp_path / "pasv"
        p = lab.ns(lab.client, ["curl", "-sS", "--max-time", "10", "-o", str(out),
                                f"ftp://{SERVERS['vsftpd']}/small.txt"], check=False)
        assert p.returncode == 0, p.stderr
        assert sha256(out) == sha256(lab.files / "small.txt")
    finally:
        remove_static_rules(lab)
    assert "FTPALG" not in lab.ruleset() and "ftpalg" not in lab.ruleset()


SESSIONS_CLIENT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from ftpalg.lab.ftpclient import main
for args in json.loads(sys.argv[2]):
    assert main(args) == 0, args
"""


def sessions(lab: Lab, ns: str, argvs: list[list[str]]) -> subprocess.CompletedProcess[str]:
    """One ``ftpalg.lab.ftpclient`` session after the other in ``ns``, each with its arguments."""
    root = str(Path(__file__).resolve().parent.parent)
    return lab.ns(ns, [sys.executable, "-c", SESSIONS_CLIENT, root, json.dumps(argvs)], check=False)


def sequential(lab: Lab) -> subprocess.CompletedProcess[str]:
    hosts = (SERVERS["vsftpd"], SERVERS["pyftpdlib"])
    return sessions(lab, lab.client, [[host, "get", "small.txt", "/dev/null", "--mode", mode, "--data-port", str(port)]
                                      for mode, port in (("PORT", 41000), ("EPRT", 41001)) for host in hosts])


def check_sequential(seen: Seen) -> None:
    assert seen.received == ["PORT 203,0,113,1,160,40"] * 2 + ["EPRT |1|203.0.113.1|41001|"] * 2, seen


def passive(lab: Lab) -> subprocess.CompletedProcess[str]:
    """An outside client of the inside vsftpd and pyftpdlib behind gw2: PASV, then EPSV."""
    hosts = (PUBLIC_OF["vsftpd"], PUBLIC_OF["pyftpdlib"])
    return sessions(lab, lab.server, [[host, "get", "small.txt", "/dev/null", "--mode", mode,
                                       "--source", OUTSIDE_CLIENTS[0]] for mode in ("PASV", "EPSV") for host in hosts])


def check_passive(seen: Seen) -> None:
    publics = [PUBLIC_OF[k].replace(".", ",") for k in ("vsftpd", "pyftpdlib")]
    assert [t[:4] for t in seen.received] == ["227 "] * 2 + ["229 "] * 2, seen
    assert all(a in t for a, t in zip(publics, seen.received[:2], strict=True)), seen


@dataclass(frozen=True)
class Scenario:
    """Sessions through one gateway; where the party behind it and the other end are seen."""

    run: Callable[[Lab], subprocess.CompletedProcess[str]]
    check: Callable[[Seen], None]
    active: bool  # through gw1 (inside clients, PORT/EPRT), else gw2 (inside servers, 227/229)
    transfers: int  # how many file checksums the run prints (ftpclient's sessions fail on their own)

    def gateway(self, lab: Lab) -> str:
        return lab.gw if self.active else lab.gw2

    def captures(self, lab: Lab, mode: str) -> tuple[Capture, Capture]:
        """(as sent behind the gateway, as received beyond it): the gateway's two links."""
        behind = (lab.client, "c0") if self.active else (lab.inside, "i0")
        beyond = "s0" if self.active else "s1"
        return (Capture(lab, f"diff-{mode}-sent", *behind, bpf=CONTROL_AND_SYNS),
                Capture(lab, f"diff-{mode}-received", lab.server, beyond, bpf=CONTROL_AND_SYNS))


SCENARIOS = {
    "sequential": Scenario(sequential, check_sequential, active=True, transfers=0),
    "port-collision": Scenario(collide, check_collision, active=True, transfers=2),
    "passive": Scenario(passive, check_passive, active=False, transfers=0),
}


def compare_with_kernel(kernel: Seen, alg: Seen) -> None:
    """ftpalg's announcements as received say what the kernel's do, one by one: the same
    text (address included) but for the port; the same port where the kernel kept the one
    announced behind the gateway, another one where the kernel had to pick another one (the
    port was taken). In both runs each data connection used the port announced."""
    assert len(kernel.sent) == len(kernel.received) == len(alg.sent) == len(alg.received) > 0, (kernel, alg)
    for k_sent, k_received, f_sent, f_received in zip(kernel.sent, kernel.received, alg.sent, alg.received,
                                                      strict=True):
        (k_text, k_port), (f_text, f_port) = split_port(k_received), split_port(f_received)
        assert f_text == k_text, (k_received, f_received)
        kept = k_port == split_port(k_sent)[1]
        assert (f_port == split_port(f_sent)[1]) == kept, (k_sent, k_received, f_sent, f_received)
    for seen in (kernel, alg):
        assert seen.data_ports == [split_port(t)[1] for t in seen.received], seen


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_differential_against_kernel_helper(lab, scenario):
    """The PORT/EPRT the server receives and the 227/229 the client receives are the same
    with the kernel's nf_nat_ftp helper and with ftpalg, for the same sessions (fixed data
    ports where the client chooses them), compared one by one (``compare_with_kernel``):
    identical where the kernel keeps the announced port, and where it cannot (two clients
    announce the same port) the same address and a port of its own that the data
    connection really used."""
    sc = SCENARIOS[scenario]
    gw = sc.gateway(lab)
    helper = ["PREROUTING", "-p", "tcp", "--dport", "21", "-j", "CT", "--helper", "ftp"]
    seen = {}
    for mode in ("kernel", "ftpalg"):
        caps = sc.captures(lab, mode)
        if mode == "kernel":
            lab.ns(gw, ["iptables", "-t", "raw", "-A", *helper])
            try:
                res = sc.run(lab)
            finally:
                lab.ns(gw, ["iptables", "-t", "raw", "-D", *helper])
                lab.ns(gw, ["conntrack", "-F"], check=False)
                lab.ns(gw, ["conntrack", "-F", "expect"], check=False)
        else:
            p = lab.start_ftpalg(gw=gw)
            try:
                res = sc.run(lab)
            finally:
                lab.stop_ftpalg(p)
        for c in caps:
            c.stop()
        seen[mode] = Seen.of(*caps)
        sc.check(seen[mode])  # the same rules hold for the kernel's text and for ftpalg's
        assert res.returncode == 0, (mode, res.stderr)
        assert res.stdout.split() == [sha256(lab.files / "small.txt")] * sc.transfers, (mode, res.stdout)
    compare_with_kernel(seen["kernel"], seen["ftpalg"])


def test_queue_backend_auto_is_the_tested_path(lab, tmp_path):
    """--queue-backend auto (the default) is iptables' NFQUEUE, the path every netns test
    runs, whether or not the kernel has nft's queue statement (only loaded here, never run
    with traffic: opt-in as --queue-backend nft); forcing nft on a kernel without it fails
    clearly and leaves nothing behind."""
    probe = lab.ns(lab.gw, [sys.executable, "-c", "from ftpalg.linux.rules import nft_queue_available; "
                                                  "print(nft_queue_available())"])
    has_nft_queue = probe.stdout.strip() == "True"
    assert "ftpalg_probe" not in lab.ns(lab.gw, ["nft", "list", "tables"]).stdout
    for args in ([], ["--queue-backend", "auto"]):
        p = lab.start_ftpalg(*args)
        try:
            assert "queue via iptables" in lab.ftpalg_log()
            assert "NFQUEUE" in lab.gw_rules()
            assert "queue" not in lab.ns(lab.gw, ["nft", "list", "table", "inet", "ftpalg"]).stdout
        finally:
            assert lab.stop_ftpalg(p) == 0
    if not has_nft_queue:
        res = lab.ns(lab.gw, [*ftpalg_argv(), "run", "--queue-backend", "nft", "--queue", "all"], check=False,
                     timeout=30)
        assert res.returncode == 1
        assert "queue" in res.stderr and "Error" in res.stderr
    assert "FTPALG" not in lab.ruleset()
    assert "ftpalg" not in lab.ns(lab.gw, ["nft", "list", "tables"]).stdout


def test_no_rules_mode_uses_admin_rules_and_removes_only_its_pinholes(lab, tmp_path):
    """--no-rules: the admin loads deploy/ files; ftpalg adds/removes pinholes only, and on
    exit removes the ones still open while the admin's chains stay."""
    load_deploy_files(lab)
    try:
        loaded = lab.ruleset()
        p = lab.start_ftpalg("--no-rules")
        out = tmp_path / "f"
        res = lab.transfer(CLIENT_KINDS[0], "vsftpd", "small.txt", out)
        assert res.returncode == 0, res.stderr
        assert no_pinholes_soon(lab)
        code = f"""
            import ftplib, socket
            ftp = ftplib.FTP("{SERVERS['vsftpd']}", timeout=10)  # connects at RETR, not at PORT
            ftp.login()
            ls = socket.create_server(("{CLIENTS[0]}", 0))
            print(ftp.sendport("{CLIENTS[0]}", ls.getsockname()[1]), flush=True)
            input()
        """
        client = subprocess.Popen(["ip", "netns", "exec", lab.client, sys.executable, "-c", textwrap.dedent(code)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout.readline().startswith("200")
            assert len(lab.expectations()) == 1, lab.ftpalg_log()  # open while ftpalg runs
        finally:
            rc = lab.stop_ftpalg(p)
        try:
            assert rc == 0
            assert lab.expectations() == []  # removed on exit, not left for the kernel to keep
            assert lab.ruleset() == loaded  # the admin's rules stay
        finally:
            client.kill()
    finally:
        remove_static_rules(lab)


def test_second_instance_refuses_and_leaves_the_first_intact(lab, alg):
    rules = lab.ruleset()
    res = lab.ns(lab.gw, [*ftpalg_argv(), "run"], check=False, timeout=30)
    assert res.returncode == 1 and "another ftpalg run" in res.stderr
    assert lab.ruleset() == rules  # the running instance's rules are untouched


def test_no_rules_without_chains_fails_clearly(lab):
    res = lab.ns(lab.gw, [*ftpalg_argv(), "run", "--no-rules"], check=False, timeout=30)
    assert res.returncode == 1 and "ftpalg.nft" in res.stderr and "/etc/ftpalg/rules/" in res.stderr
    socks = lab.ns(lab.gw, ["cat", "/proc/net/unix"]).stdout
    assert "@ftpalg-run" not in socks  # its instance lock is gone too


def test_sessions_survive_control_packet_loss(lab, alg):
    """20 % of the control segments that carry a line dropped after the gateway, both ways
    (iptables statistic in the end hosts: tc netem is not available). Retransmitted PORT
    lines must come out of ftpalg exactly as the first copy, and every transfer must complete.

    Only segments with PSH (every line here) are dropped, not SYN, SYN-ACK or pure ACKs: a
    handshake that loses them waits out backed-off SYN-ACKs, and once a SYN-ACK is lost after
    the client has its copy, the client's ACKs echo the first one's timestamp, the server's
    TCP takes that as an RTT sample of seconds and its retransmission timeout grows to 16,
    37, 71 s. Either outlasted the client's 60 s timeout in 2 of 29 runs: a test of TCP, not
    of ftpalg."""
    line = ["--tcp-flags", "SYN,PSH", "PSH"]
    drops = [
        (lab.server, ["INPUT", "-p", "tcp", "--dport", "21", *line]),
        (lab.client, ["INPUT", "-p", "tcp", "--sport", "21", *line]),
    ]
    for ns, spec in drops:
        lab.ns(ns, ["iptables", "-A", *spec, "-m", "statistic", "--mode", "random", "--probability", "0.2",
                    "-j", "DROP"])
    cap = Capture(lab, "loss")
    try:
        res = ns_python(lab, lab.client, f"""
            import hashlib, sys
            sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
            from ftpalg.lab.ftpclient import ActiveFTP
            for i in range(8):
                host = {SERVERS['vsftpd']!r} if i % 2 else {SERVERS['pyftpdlib']!r}
                ftp = ActiveFTP(eprt=bool(i % 4 < 2), data_port=42000 + i, timeout=60)
                ftp.connect(host, 21)
                ftp.login()
                for _ in range(2):
                    h = hashlib.sha256()
                    ftp.retrbinary("RETR small.txt", h.update)
                    print(h.hexdigest(), flush=True)
                ftp.quit()
        """, timeout=400)
    finally:
        for ns, spec in drops:
            lab.ns(ns, ["iptables", "-D", *spec, "-m", "statistic", "--mode", "random", "--probability", "0.2",
                        "-j", "DROP"])
    wire = cap.stop()
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [sha256(lab.files / "small.txt")] * 16
    copies: dict[tuple[int, int], set[bytes]] = {}  # what the server's interface saw, per (port, seq)
    for p in rdpcap(str(cap.path)):
        if TCP in p and p[TCP].dport == 21 and bytes(p[TCP].payload):
            copies.setdefault((p[TCP].sport, p[TCP].seq), set()).add(bytes(p[TCP].payload))
    sent = sum(1 for p in rdpcap(str(cap.path)) if TCP in p and p[TCP].dport == 21 and bytes(p[TCP].payload))
    assert sent > len(copies)  # there were retransmissions ...
    for v in copies.values():  # ... and every copy of a byte range carries the same bytes
        longest = max(v, key=len)
        assert all(longest.startswith(c) for c in v), v
    announced = commands(wire, b"PORT") + commands(wire, b"EPRT")
    assert len(set(announced)) == 8  # one text per session (fixed data port), however often sent
    assert all(b"203,0,113,1" in a or b"203.0.113.1" in a for a in announced)
    assert no_pinholes_soon(lab)


def test_extra_control_port(lab, tmp_path):
    """--control-port is repeatable: a server on 2121 is handled as well as one on 21."""
    server = lab.popen(lab.server, [sys.executable, "-m", "ftpalg.lab.servers", SERVERS["pyftpdlib"],
                                    str(lab.files), "2121"])
    try:
        lab.wait_port(lab.server, SERVERS["pyftpdlib"], 2121)
        p = lab.start_ftpalg("--control-port", "21", "--control-port", "2121")
        try:
            for port in (2121, 21):
                out = tmp_path / f"f{port}"
                res = lab.ns(lab.client, [sys.executable, "-m", "ftpalg.lab.ftpclient", SERVERS["pyftpdlib"], "get",
                                          "big.bin", str(out), "--port", str(port)], check=False)
                assert res.returncode == 0, res.stderr
                assert sha256(out) == sha256(lab.files / "big.bin")
            assert lab.ftpalg_log().count("pinhole open") == 2
        finally:
            assert lab.stop_ftpalg(p) == 0
    finally:
        server.terminate()
        server.wait(10)
        lab.procs.remove(server)


HOSTILE_CLIENT = r"""
import ftplib, hashlib, sys, time
ftp = ftplib.FTP(timeout=10, encoding="latin-1")
ftp.connect(sys.argv[1], 21)
ftp.login()
s = ftp.sock


def expect_error(raw):
    s.sendall(raw)
    try:
        ftp.getresp()
    except ftplib.Error:
        pass


for line in [b"PORT 10,0,0,2,999,1", b"PORT 10,0,0,2,0,0", b"EPRT |1|10.0.0.2|70000|",
             b"EPRT |2|10.0.0.2|5000|", b"PORT 10,0,0,9,4,1", b"EPRT |1|10.0.0.999|5000|",
             b"PORT " + bytes(range(0xa0, 0x100))]:
    expect_error(line + b"\r\n")
s.sendall(b"PORT 10,0,0")  # one command split across two segments
time.sleep(0.2)
expect_error(b",2,4,1\r\n")
print(ftp.voidcmd("NOOP"))
ftp.set_pasv(False)
h = hashlib.sha256()
ftp.retrbinary("RETR small.txt", h.update)
print(h.hexdigest())
ftp.quit()
"""


def test_hostile_lines_pass_unchanged_and_never_wedge_the_session(lab, alg):
    """Malformed and bounce PORT/EPRT lines and binary junk go through unchanged and open
    nothing, a good PORT split across segments is joined and rewritten; the session stays
    usable and a later good PORT still works."""
    cap = Capture(lab, "hostile")
    res = lab.ns(lab.client, [sys.executable, "-c", HOSTILE_CLIENT, SERVERS["pyftpdlib"]], check=False)
    wire = cap.stop()
    assert res.returncode == 0, res.stderr
    out = res.stdout.split("\n")
    assert out[0].startswith("200") and out[1] == sha256(lab.files / "small.txt")
    seen = b"".join(wire)
    for raw in (b"PORT 10,0,0,2,999,1", b"EPRT |1|10.0.0.2|70000|", b"PORT 10,0,0,9,4,1"):
        assert raw in seen  # unchanged on the server's side
    assert b"PORT 10,0,0,2,4,1" not in seen  # the split one was joined and rewritten
    log = lab.ftpalg_log()
    assert "malformed" in log and "refused" in log
    assert log.count("pinhole open") == 2  # the split PORT (the server then fails to connect) and the transfer's


def test_pinhole_lets_in_one_connection_only(lab, alg):
    """One-shot, like a kernel expectation: pyftpdlib connects as soon as it reads PORT; a
    second connection from the same server to the same public port gets nowhere."""
    client = subprocess.Popen(["ip", "netns", "exec", lab.client, sys.executable, "-c", textwrap.dedent(f"""
        import ftplib, socket
        ftp = ftplib.FTP("{SERVERS['pyftpdlib']}", timeout=10)
        ftp.login()
        ls = socket.create_server(("{CLIENTS[0]}", 46000), backlog=8)
        print(ftp.sendport("{CLIENTS[0]}", 46000), flush=True)  # the server connects now
        ls.settimeout(5)
        first, _ = ls.accept()
        print("first", flush=True)
        try:
            ls.accept()
            print("second accepted", flush=True)
        except OSError:
            print("no second", flush=True)
        input()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().startswith("200")
        assert client.stdout.readline().strip() == "first"
        assert lab.expectations() == []  # used up by the first connection: one-shot
        probe = ns_python(lab, lab.server, f"""
            import socket
            try:
                socket.create_connection(("{GW_PUBLIC}", 46000), timeout=2,
                                         source_address=("{SERVERS['pyftpdlib']}", 0))
                print("connected")
            except OSError as e:
                print("refused", e)
        """)
        assert probe.stdout.startswith("refused"), probe.stdout
        assert client.stdout.readline().strip() == "no second"
    finally:
        client.kill()
        client.wait()
