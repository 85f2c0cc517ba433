"""Servers behind NAT, double NAT and IPv6, end to end in network namespaces: real kernel NAT
and conntrack, DROP-policy firewalls on both gateways, real servers, checksums of what was
transferred, captures of what crossed the wire and the pinhole rules that existed.

Tests that need no ALG come first; the module-scoped ``algs`` fixture then runs
``ftpalg run`` in both gateways for the rest of the module."""

from __future__ import annotations

import ast
import subprocess
import sys
import time

import pytest
from scapy.layers.inet import TCP
from scapy.utils import rdpcap

from ftpalg.lab.ftpclient import MODES
from ftpalg.lab.hostile import Driver
from ftpalg.lab.lab import (
    BOTH_NAT_PUBLIC,
    CLIENTS,
    CLIENTS6,
    FORWARDED_PORT,
    INSIDE_SERVERS,
    INSIDE_SERVERS6,
    OUTSIDE_CLIENTS,
    OUTSIDE_CLIENTS6,
    PUBLIC_OF,
    SERVERS,
    SERVERS6,
    Lab,
    sha256,
)
from ftpalg.linux.rules import SELECT_REPLIES
from netns_checks import check_pasv_pinhole_admits_only_the_announced_client, no_pinholes_soon, queued

pytestmark = pytest.mark.netns

KINDS = list(INSIDE_SERVERS)
FILE = "small.txt"


def fetch(lab: Lab, ns: str, host: str, mode: str, source: str, port: int = 21,
          name: str = FILE) -> subprocess.CompletedProcess[str]:
    """Download ``name`` with the lab's ftplib client in ``mode``; stdout: the SHA-256."""
    out = lab.state / f"fetch-{mode}-{host}-{source}-{port}".replace(":", "_")
    out.unlink(missing_ok=True)
    res = lab.ns(ns, [sys.executable, "-m", "ftpalg.lab.ftpclient", host, "get", name, str(out), "--mode", mode,
                      "--port", str(port), "--source", source, "--timeout", "8"], check=False, timeout=30)
    res.stdout = sha256(out) if res.returncode == 0 and out.exists() else ""
    out.unlink(missing_ok=True)
    return res


def ok(res: subprocess.CompletedProcess[str], lab: Lab, name: str = FILE) -> bool:
    return res.returncode == 0 and res.stdout == sha256(lab.files / name)


def passive_modes(kind: str) -> list[str]:
    return ["PASV", "EPSV"] + (["LPSV"] if kind == "pyftpdlib" else [])


def active_modes(kind: str) -> list[str]:
    return ["PORT", "EPRT"] + (["LPRT"] if kind == "pyftpdlib" else [])


def modes(kind: str) -> list[tuple[str, str]]:
    return [(kind, m) for m in passive_modes(kind) + active_modes(kind)]


ALL4 = [km for k in KINDS for km in modes(k)]


# ---- without any ALG: the lab breaks what ftpalg must fix ----------------------------------
# The same client as fetch(), with ftplib's debug transcript (every command and reply) on stdout.
TRANSCRIBED = "import ftplib, sys; ftplib.FTP.debugging = 1; from ftpalg.lab.ftpclient import main; sys.exit(main())"


def syns(path) -> set[tuple[str, int]]:
    """(destination, port) of each connection attempt in a capture."""
    return {(p[TCP].underlayer.dst, p[TCP].dport) for p in rdpcap(str(path)) if TCP in p and p[TCP].flags == "S"}


def check_only_the_data_connection_fails(lab: Lab, kind: str, host: str, mode: str, source: str) -> None:
    """An outside client fetches from the server behind gw2 in ``mode``: it reaches the server,
    logs in and sends the mode's command, the server answers a passive one; what fails is the
    data connection only, at gw2: its SYN is seen on one side of gw2 and never on the other
    (a PASV reply's private address cannot even be reached from outside). The captures may
    hold retries of earlier cases' SYNs: only this case's connection is looked at."""
    outside, inside = lab.state / "no-alg-s1.pcap", lab.state / "no-alg-i0.pcap"
    caps = [lab.capture(lab.server, "s1", outside, "tcp and not port 21"),
            lab.capture(lab.inside, "i0", inside, "tcp and not port 21")]
    out = lab.state / "no-alg.out"
    try:
        res = lab.ns(lab.server, [sys.executable, "-c", TRANSCRIBED, host, "get", FILE, str(out), "--mode", mode,
                                  "--source", source, "--timeout", "4"], check=False, timeout=40)
    finally:
        for c in caps:
            Lab.stop_capture(c)
    why = f"{kind} {mode}: rc {res.returncode}\n{res.stdout[-2500:]}\n{res.stderr[-1000:]}"
    out.unlink(missing_ok=True)
    assert res.returncode == 1, why  # the transfer failed
    said = [(line.split(" ", 1)[0], ast.literal_eval(line.split(" ", 1)[1])) for line in res.stdout.splitlines()
            if line.startswith(("*cmd* ", "*resp* "))]
    replies = [r for w, r in said if w == "*resp*"]
    commands = [c.split()[0] for w, c in said if w == "*cmd*"]
    assert replies and replies[0].startswith("220"), why  # reached the server: its banner
    assert any(r.startswith("230") for r in replies), why  # logged in
    assert "TYPE" in commands and commands[commands.index("TYPE") + 1:][:1] == [mode], why  # then the mode's
    assert not set(commands) & (set(MODES) - {mode}), why
    out_syns, in_syns = syns(outside), syns(inside)
    if mode in ("PASV", "EPSV"):
        last, reply = said[-1]
        assert last == "*resp*" and reply.startswith("227" if mode == "PASV" else "229"), why  # answered
        assert "RETR" not in commands and res.stderr.startswith(("OSError", "TimeoutError")), why  # no data
        if mode == "PASV":  # the server's own private address, unreachable from outside
            assert reply.split("(")[1].startswith(INSIDE_SERVERS[kind].replace(".", ",") + ","), why
            assert "Network is unreachable" in res.stderr, why
        else:  # the client's SYN to the 229 port reaches gw2 and goes no further
            port = int(reply.split("|||")[1].split("|")[0])
            assert (host, port) in out_syns and (host, port) not in in_syns, (why, out_syns, in_syns)
    else:  # the server's SYN to the port the client announced reaches gw2 and goes no further
        assert res.stderr.startswith("TimeoutError"), why  # waiting for the server's answer
        eprt = next(c for w, c in said if w == "*cmd*" and c.startswith(mode))
        port = int(eprt.split("|")[3])
        assert (source, port) in in_syns and (source, port) not in out_syns, (why, out_syns, in_syns)


def test_without_alg_passive_and_active_fail_towards_inside_servers(lab):
    for kind in KINDS:
        for mode in ("PASV", "EPRT"):
            check_only_the_data_connection_fails(lab, kind, PUBLIC_OF[kind], mode, OUTSIDE_CLIENTS[0])
    assert lab.expectations(lab.gw2) == []


def test_without_alg_ipv6_data_connections_are_dropped(lab):
    for mode in ("EPSV", "EPRT"):
        check_only_the_data_connection_fails(lab, "vsftpd", INSIDE_SERVERS6["vsftpd"], mode, OUTSIDE_CLIENTS6[0])


def replies(path, code: bytes) -> list[bytes]:
    return [line.strip() for p in rdpcap(str(path)) if TCP in p
            for line in bytes(p[TCP].payload).splitlines() if line.startswith(code)]


@pytest.mark.parametrize("mode, code", [("PASV", b"227"), ("EPSV", b"229")])
def test_differential_against_kernel_helper_for_passive_replies(lab, mode, code):
    """Server behind DNAT: the kernel's nf_nat_ftp and ftpalg turn the server's 227/229 into
    the same text for the client (modulo the port the server picked), and both transfers
    work. Runs before the module's ``algs`` fixture starts ftpalg for good."""
    kind = "vsftpd"
    helper = ["PREROUTING", "-p", "tcp", "--dport", "21", "-j", "CT", "--helper", "ftp"]
    seen = {}
    for who in ("kernel", "ftpalg"):
        inner, outer = lab.state / f"d-{who}-in.pcap", lab.state / f"d-{who}-out.pcap"
        caps = [lab.capture(lab.inside, "i0", inner), lab.capture(lab.server, "s1", outer)]
        if who == "kernel":
            lab.ns(lab.gw2, ["iptables", "-t", "raw", "-A", *helper])
            try:
                res = fetch(lab, lab.server, PUBLIC_OF[kind], mode, OUTSIDE_CLIENTS[0])
            finally:
                lab.ns(lab.gw2, ["iptables", "-t", "raw", "-D", *helper])
                lab.ns(lab.gw2, ["conntrack", "-F"], check=False)
        else:
            p = lab.start_ftpalg(gw=lab.gw2)
            try:
                res = fetch(lab, lab.server, PUBLIC_OF[kind], mode, OUTSIDE_CLIENTS[0])
            finally:
                assert lab.stop_ftpalg(p) == 0
        for c in caps:
            Lab.stop_capture(c)
        assert ok(res, lab), (who, res.stderr[-1500:])
        (sent,), (got,) = replies(inner, code), replies(outer, code)
        private, public = INSIDE_SERVERS[kind], PUBLIC_OF[kind]
        if code == b"227":
            assert private.replace(".", ",").encode() in sent
            sent = sent.replace(private.replace(".", ",").encode(), public.replace(".", ",").encode())
        seen[who] = got
        assert got == sent, (who, sent, got)  # both apply exactly this transformation
    assert seen["kernel"].split(b"(")[0] == seen["ftpalg"].split(b"(")[0]  # same text around it


# ---- with ftpalg in both gateways ---------------------------------------------------------
@pytest.fixture(scope="module")
def algs(lab):
    """``ftpalg run`` in both gateways (gw2 also watches the forwarded port 2121 and the
    pasv_address test's port 2100) for the rest of the module; checks it cleaned up."""
    before = {gw: lab.ruleset(gw) for gw in lab.gateways}
    p1 = lab.start_ftpalg()
    p2 = lab.start_ftpalg("--control-port", "21", "--control-port", "2121", "--control-port", "2100", gw=lab.gw2)
    yield
    for gw, p in ((lab.gw, p1), (lab.gw2, p2)):
        assert lab.stop_ftpalg(p) == 0
        assert lab.ruleset(gw) == before[gw]  # exactly as found
        assert "Traceback" not in lab.ftpalg_log_path(gw).read_text()


@pytest.mark.parametrize("kind, mode", ALL4, ids=[f"{k}-{m}" for k, m in ALL4])
def test_outside_client_to_server_behind_dnat(lab, algs, kind, mode):
    """Only port 21 is forwarded; PASV with the 227 address trusted, EPSV, active modes."""
    res = fetch(lab, lab.server, PUBLIC_OF[kind], mode, OUTSIDE_CLIENTS[0])
    assert ok(res, lab), res.stderr[-1500:]
    assert no_pinholes_soon(lab, lab.gw2)  # nothing survives the session


@pytest.mark.parametrize("kind, mode", ALL4, ids=[f"{k}-{m}" for k, m in ALL4])
def test_double_nat_inside_client_to_inside_server(lab, algs, kind, mode):
    """Client behind gw (MASQUERADE) to server behind gw2 (DNAT), ftpalg in both."""
    res = fetch(lab, lab.client, PUBLIC_OF[kind], mode, CLIENTS[0])
    assert ok(res, lab), res.stderr[-1500:]
    assert no_pinholes_soon(lab, lab.gw) and no_pinholes_soon(lab, lab.gw2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["EPSV", "EPRT"])
def test_ipv6_stateful_gateway_without_nat(lab, algs, kind, mode):
    res = fetch(lab, lab.server, INSIDE_SERVERS6[kind], mode, OUTSIDE_CLIENTS6[0])
    assert ok(res, lab), res.stderr[-1500:]
    assert no_pinholes_soon(lab, lab.gw2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["EPRT", "EPSV"])
def test_nat66_client_behind_gateway(lab, algs, kind, mode):
    res = fetch(lab, lab.client, SERVERS6[kind], mode, CLIENTS6[0])
    assert ok(res, lab), res.stderr[-1500:]


@pytest.mark.parametrize("mode", ["PASV", "EPSV", "PORT", "EPRT"])
def test_forwarded_control_port_2121(lab, algs, mode):
    host, port = FORWARDED_PORT
    res = fetch(lab, lab.server, host, mode, OUTSIDE_CLIENTS[0], port=port)
    assert ok(res, lab), res.stderr[-1500:]


@pytest.mark.parametrize("mode", ["PASV", "EPSV", "PORT", "EPRT"])
def test_one_gateway_dnats_the_server_and_snats_the_client(lab, algs, mode):
    """198.51.100.6 is DNATed to vsftpd and its clients SNATed to 10.1.0.1: the data
    connection must get both translations, or vsftpd refuses it (425 Security: Bad IP)."""
    res = fetch(lab, lab.server, BOTH_NAT_PUBLIC, mode, OUTSIDE_CLIENTS[0])
    assert ok(res, lab), res.stderr[-1500:]


@pytest.mark.parametrize("kind", KINDS)
def test_upload_through_dnat_in_passive_mode(lab, algs, kind):
    src = lab.state / f"up-{kind}"
    src.write_bytes(bytes(range(256)) * 1000)
    name = f"upload/pasv-{kind}.bin"
    res = lab.ns(lab.server, [sys.executable, "-m", "ftpalg.lab.ftpclient", PUBLIC_OF[kind], "put", str(src), name,
                              "--mode", "PASV", "--source", OUTSIDE_CLIENTS[0]], check=False, timeout=30)
    assert res.returncode == 0, res.stderr[-1500:]
    assert sha256(lab.files / name) == sha256(src)


def test_pasv_pinhole_is_only_for_the_announced_client(lab, algs):
    """The 227 names a public port; only the client of that control connection may use it,
    once. A second, unrelated outside client gets nothing, and afterwards neither does the
    first one."""
    check_pasv_pinhole_admits_only_the_announced_client(lab)


def test_active_mode_data_connection_leaves_with_the_public_address(lab, algs):
    """vsftpd behind gw2 connects from port 20 of its private address; the client must see
    the connection come from the public address it used (a pinhole SNATs it out)."""
    path = lab.state / "active-out.pcap"
    cap = lab.capture(lab.server, "s1", path, bpf="tcp and not port 21")
    res = fetch(lab, lab.server, PUBLIC_OF["vsftpd"], "PORT", OUTSIDE_CLIENTS[0])
    Lab.stop_capture(cap)
    assert ok(res, lab), res.stderr[-1500:]
    syns = [p for p in rdpcap(str(path)) if TCP in p and p[TCP].flags == "S"]
    assert syns and all(p["IP"].src == PUBLIC_OF["vsftpd"] and p[TCP].sport == 20 for p in syns), \
        [p.summary() for p in syns]


def test_server_announcing_the_public_address_still_gets_its_port_opened(lab, algs):
    """pyftpdlib with masquerade_address = the public address (like vsftpd pasv_address):
    nothing to rewrite, but the port must still be opened, and only for this client."""
    public, inside, port = PUBLIC_OF["pyftpdlib"], INSIDE_SERVERS["pyftpdlib"], 2100
    rules = [("nat", ["PREROUTING", "-d", public, "-p", "tcp", "--dport", str(port), "-j", "DNAT",
                      "--to-destination", f"{inside}:{port}"]),
             ("filter", ["FORWARD", "-d", inside, "-p", "tcp", "--dport", str(port), "-m", "conntrack",
                         "--ctstate", "DNAT", "-j", "ACCEPT"])]
    server = lab.popen(lab.inside, [sys.executable, "-m", "ftpalg.lab.servers", inside, str(lab.files), str(port),
                                    public])
    for table, r in rules:
        lab.ns(lab.gw2, ["iptables", "-t", table, "-I", *r])
    try:
        lab.wait_port(lab.inside, inside, port)
        res = fetch(lab, lab.server, public, "PASV", OUTSIDE_CLIENTS[0], port=port)
        assert ok(res, lab), res.stderr[-1500:]
        log = lab.ftpalg_log_path(lab.gw2).read_text()
        assert f"to={public}:" in log and "unchanged" in log
    finally:
        for table, r in rules:
            lab.ns(lab.gw2, ["iptables", "-t", table, "-D", *r])
        server.terminate()
        server.wait(10)
        lab.procs.remove(server)


def test_unsolicited_227_from_the_client_side_opens_nothing(lab, algs):
    """An outside client sends ``227 Entering Passive Mode (...)`` as a command: nothing is
    expected. The kernel never queues it (no address verb: ``queue = "selected"``): gw2's
    queue count does not move for it (only for a reply that quotes a passive code). The
    contrast: the same client's PASV and the server's 227 are queued, and that opens a
    pinhole. (tests/test_netns_attacks.py has ftpalg read such a line, with every segment
    queued: reported as unsolicited.)"""
    assert no_pinholes_soon(lab, lab.gw2)
    with Driver(lab, lab.server, PUBLIC_OF["pyftpdlib"], OUTSIDE_CLIENTS[0]) as d:
        assert d.step("cmd USER anonymous").startswith("331") and d.step("cmd PASS x").startswith("230")
        before = queued(lab, lab.gw2)
        refused = d.step("cmd 227 Entering Passive Mode (10,1,0,3,117,48)")
        assert refused.startswith("5") and d.step("cmd NOOP").startswith("200"), refused
        # pyftpdlib quotes the command (500 Command "227" not understood): that reply is a
        # server segment carrying 227, queued and read as a 500; the client's line is not
        echoed = any(code in refused for code in SELECT_REPLIES)
        assert queued(lab, lab.gw2) == before + echoed and lab.expectations(lab.gw2) == []
        reply = d.step("cmd PASV")
        assert reply.startswith("227") and PUBLIC_OF["pyftpdlib"].replace(".", ",") in reply, reply
        assert queued(lab, lab.gw2) == before + echoed + 2 and len(lab.expectations(lab.gw2)) == 1
    assert no_pinholes_soon(lab, lab.gw2)  # its FIN closed the unused pinhole


# ---- what leaves the kernel -----------------------------------------------------------------
QUEUED_AT_MOST = 4  # per session (login, one transfer, QUIT) with queue = "selected"


@pytest.mark.parametrize("mode", ["PASV", "PORT"])
def test_a_session_queues_only_its_address_lines_and_its_fins(lab, algs, mode, record_property):
    """Selected queueing (the default): of a whole session (login, one download, QUIT) only
    the lines that carry or ask for an address, and the two FINs, leave the kernel; every
    other segment (greeting, USER/331, PASS/230, TYPE/200, RETR/150/226, QUIT/221, ACKs,
    SYNs) is handled by the kernel alone. PASV through gw2's DNAT (outside client, inside
    vsftpd): PASV, 227 and the FINs; PORT through gw's MASQUERADE (inside client, outside
    vsftpd): PORT and the FINs. Counted by the gateway's NFQUEUE id sequence: a property of
    the queue rules, not of timing (with every segment queued: ~15, every command and reply)."""
    if mode == "PASV":
        gw, ns, host, source, want = lab.gw2, lab.server, PUBLIC_OF["vsftpd"], OUTSIDE_CLIENTS[0], 4
    else:
        gw, ns, host, source, want = lab.gw, lab.client, SERVERS["vsftpd"], CLIENTS[0], 3
    assert no_pinholes_soon(lab, gw)
    before = queued(lab, gw)
    res = fetch(lab, ns, host, mode, source)
    assert ok(res, lab), res.stderr
    deadline = time.monotonic() + 3  # the last FIN may still be on its way when the client exits
    while queued(lab, gw) - before < want and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # nothing more comes
    n = queued(lab, gw) - before
    record_property("queued_per_session", n)
    print(f"{mode}: {n} packets queued for the session")
    assert n == want <= QUEUED_AT_MOST, n
