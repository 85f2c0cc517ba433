"""Attacks on the pinholes, with real traffic in the namespace lab: none may open a path.

Each test runs an attack through a gateway running ftpalg and shows, with evidence, that no
connection reaches a host or port it should not: a listener on the target records every
connection it accepts (it must see none), the gateway's conntrack expectations show nothing
was opened, and ftpalg's log gives the reason. A legitimate session in the same run must
still transfer the file (checksum). Where the kernel's own FTP helper (nf_conntrack_ftp +
nf_nat_ftp, ``iptables -t raw ... -j CT --helper ftp``) lets the attack through, the same
attack runs with it first, ftpalg stopped: the same listener then records the connection,
which proves the test would catch an open path. The helper rule is removed and conntrack
flushed before ftpalg starts; the two never run together.

The hostile parties (listener, scripted server, step-by-step client, forged segments) are in
``ftpalg.lab.hostile``. The hostile outside server gets an address of its own on the
"internet"; the hostile inside server takes the place of pyftpdlib at 10.1.0.3 (gw2 forwards
port 21 of 198.51.100.3 there and nowhere else) and pyftpdlib is restarted after it.

A segment forged as the other end of the attacker's own control connection (right sequence
numbers, sent into the gateway's outside interface) was read like a real one until the queue
rule gained a strict reverse-path check (the queue sits before the routing decision, where
rp_filter acts): the last two tests, run with rp_filter 0 and 1, keep it so.

A forged segment that opens nothing proves nothing unless it arrived and could have opened
something: the forged-segment tests capture the gateway's outside interface (the segment
arrived) and run the same forgery once more with the queue rule's reverse-path check
deleted (``alg_without_reverse_path_check``): ftpalg then reads it, and where it answers a
command it opens the path (the listener records the connection), else ftpalg logs why not.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP
from scapy.utils import rdpcap

from ftpalg.lab import servers
from ftpalg.lab.hostile import Driver, Listener, ScriptedServer, mac_of, pasv_text
from ftpalg.lab.lab import (
    CLIENTS,
    GW_PUBLIC,
    INSIDE_SERVERS,
    OUTSIDE_CLIENTS,
    PUBLIC_OF,
    Lab,
    ftpalg_argv,
    sha256,
    stop_processes,
)
from ftpalg.linux.rules import CHAIN_CONTROL
from netns_checks import PROBE, check_pasv_pinhole_admits_only_the_announced_client, no_pinholes_soon, queued

pytestmark = pytest.mark.netns

FILE = "small.txt"
EVIL = "203.0.113.50"
"""A hostile outside server, on an address added to "the internet" for this module."""
HELPER = ["PREROUTING", "-p", "tcp", "--dport", "21", "-j", "CT", "--helper", "ftp"]


def port_arg(addr: str, port: int) -> str:
    return f"{addr.replace('.', ',')},{port >> 8},{port & 255}"


def want_file(lab: Lab) -> str:
    return sha256(lab.files / FILE)


def require(ok: bool, what: object) -> None:
    """A step the attack needs: failing it fails the test outright, apart from the attack's
    outcome (asserted)."""
    if not ok:
        pytest.fail(str(what))


def login(d: Driver) -> None:
    r = d.step("cmd USER anonymous")
    if r.startswith("331"):
        r = d.step("cmd PASS x")
    require(r.startswith("230"), r)


def counters(log: str) -> dict[str, int]:
    """The counters ftpalg logged when it stopped."""
    (line,) = [line for line in log.splitlines() if " counters: " in line]
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split(" counters: ")[1].split())}


def server_said(srv: ScriptedServer, start: str, timeout: float = 5.0) -> str:
    """The scripted server's next reply that begins with ``start`` (from its log)."""
    done = len(srv.lines())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in srv.lines()[done:]:
            if " <- " in line and line.split(" <- ", 1)[1].startswith(start):
                return line
        time.sleep(0.05)
    pytest.fail(f"the server did not say {start!r}: {srv.lines()[done:]}")


def probe(lab: Lab, host: str, port: int, source: str = OUTSIDE_CLIENTS[1]) -> str:
    """Connect from ``source`` on the internet to ``host``:``port``: "connected" or "refused ..."."""
    return lab.ns(lab.server, [sys.executable, "-c", PROBE, host, str(port), source], check=False).stdout.strip()


@contextlib.contextmanager
def kernel_helper(lab: Lab, gw: str) -> Iterator[None]:
    """The kernel's FTP helper on the gateway's control port (ftpalg not running)."""
    assert "table inet ftpalg" not in lab.ruleset(gw) and "FTPALG" not in lab.gw_rules(gw)
    lab.ns(gw, ["iptables", "-t", "raw", "-A", *HELPER])
    try:
        yield
    finally:
        lab.ns(gw, ["iptables", "-t", "raw", "-D", *HELPER])
        lab.ns(gw, ["conntrack", "-F"], check=False)
        lab.ns(gw, ["conntrack", "-F", "expect"], check=False)


@contextlib.contextmanager
def alg(lab: Lab, gw: str, *args: str) -> Iterator[None]:
    """``ftpalg run`` in the gateway (never with the kernel helper)."""
    assert "--helper" not in lab.gw_rules(gw)
    p = lab.start_ftpalg(*args, gw=gw)
    try:
        yield
    finally:
        assert lab.stop_ftpalg(p) == 0, lab.ftpalg_log(gw)
    assert "Traceback" not in lab.ftpalg_log(gw)


RP_CHECK = ["-m", "rpfilter", "--invert", "-j", "RETURN"]
"""The queue rule's reverse-path check (iptables), see ``ftpalg.linux.rules``."""


@contextlib.contextmanager
def alg_without_reverse_path_check(lab: Lab, gw: str, *args: str) -> Iterator[None]:
    """The positive control of a forged segment: ``ftpalg run`` (iptables queue rules) with
    the reverse-path check deleted from its queue rule, as before that check existed. A
    segment forged with an inside address then reaches ftpalg: what ftpalg makes of it shows
    that the forgery is good enough to be read (right addresses, sequence numbers, frame),
    so that the deployed gateway's refusal is the check's doing. ``args``: ``--queue all``
    where the forged text is one the selection would not queue either, or would queue on a
    connection ftpalg does not track yet (see ``ALL``)."""
    with alg(lab, gw, "--queue-backend", "iptables", *args):
        lab.ns(gw, ["iptables", "-t", "mangle", "-D", CHAIN_CONTROL, *RP_CHECK])
        try:
            yield
        finally:
            lab.ns(gw, ["iptables", "-t", "mangle", "-I", CHAIN_CONTROL, "1", *RP_CHECK])


ALL = ("--queue", "all")
"""Every segment with payload queued (what the audit log needs): a connection is tracked
from its first line, and every line is read, a client's ``227`` too. With the default,
``selected``, a client's line without an address verb stays in the kernel, and a
connection is tracked from its client's first address command: a server's 227 before it
passes unread (no connection to open anything for)."""
QUEUES = ("selected", "all")


def tracked(lab: Lab, gw: str) -> int:
    """Control connections the gateway's ftpalg tracks now (``ftpalg status``)."""
    return len(json.loads(lab.ns(gw, [*ftpalg_argv(), "status", "--json"]).stdout)["flows"])


@contextlib.contextmanager
def arrivals(lab: Lab, gw: str, name: str) -> Iterator[list[tuple[str, str, bytes]]]:
    """A capture of the control port on the gateway's outside interface: once the block is
    done, (source, destination, payload) of every segment with a payload that crossed it
    (forged segments keep their inside source addresses: the gateway NATs what it sends)."""
    path = lab.state / f"{name}.pcap"
    proc = lab.capture(gw, "go", path)
    seen: list[tuple[str, str, bytes]] = []
    try:
        yield seen
    finally:
        Lab.stop_capture(proc)
    seen += [(p[IP].src, p[IP].dst, bytes(p[TCP].payload)) for p in rdpcap(str(path))
             if IP in p and TCP in p and bytes(p[TCP].payload)]


def arrived(seen: list[tuple[str, str, bytes]], src: str, dst: str, text: str) -> bool:
    """Whether a segment from ``src`` to ``dst`` carrying the line ``text`` is in ``seen``."""
    return (src, dst, (text + "\r\n").encode()) in seen


@pytest.fixture(scope="module")
def evil_outside(lab: Lab) -> Iterator[ScriptedServer]:
    """The scripted server on EVIL:21: it connects back to whatever a PORT names (and to the
    control connection's peer at that port), as no real server here would; ``SITE FORGE N``
    makes it forge its client's ``PORT 10,0,0,2,...`` into gw1's outside interface."""
    lab.ns(lab.server, ["ip", "addr", "add", f"{EVIL}/24", "dev", "s0"])
    try:
        forge = ("s0", mac_of(lab, lab.gw, "go"), CLIENTS[0])  # for SITE FORGE
        with ScriptedServer(lab, lab.server, EVIL, forge=forge, name="evil-outside") as srv:
            yield srv
    finally:
        lab.ns(lab.server, ["ip", "addr", "del", f"{EVIL}/24", "dev", "s0"], check=False)


@contextlib.contextmanager
def hostile_inside_server(lab: Lab, pasv: tuple[str, ...] = (),
                          after_login: tuple[str, ...] = ()) -> Iterator[ScriptedServer]:
    """The scripted server in place of pyftpdlib on 10.1.0.3:21 (behind 198.51.100.3:21),
    pyftpdlib restarted afterwards."""
    addr = INSIDE_SERVERS["pyftpdlib"]
    (real,) = [p for p in lab.procs if isinstance(p.args, list) and lab.inside in p.args and addr in p.args
               and "ftpalg.lab.servers" in p.args]
    stop_processes([real])
    lab.procs.remove(real)
    try:
        with ScriptedServer(lab, lab.inside, addr, pasv=pasv, after_login=after_login, name="evil-inside") as srv:
            yield srv
    finally:
        state = lab.server_state("pyftpdlib", addr)
        lab.popen(lab.inside, servers.server_command("pyftpdlib", addr, lab.files, state), state / "server.out",
                  stdin_log=True)
        lab.wait_port(lab.inside, addr, 21)


# ---- 1. PORT naming a service port of the client itself ------------------------------------
def test_port_naming_the_clients_own_port_25_opens_nothing(lab, evil_outside):
    """An inside client announces its own port 25 to a hostile outside server, which then
    connects back (to the announced address and to the gateway's public one). The kernel
    helper opens the port and the connection reaches client:25; ftpalg opens nothing."""
    target = (CLIENTS[0], 25)
    with Listener(lab, lab.client, [target], name="client-25") as ls:
        with kernel_helper(lab, lab.gw), Driver(lab, lab.client, EVIL, CLIENTS[0]) as d:
            login(d)
            assert d.step(f"cmd PORT {port_arg(*target)}").startswith("200")
            (exp,) = lab.expectations(lab.gw)
            assert f"src={EVIL} dst={GW_PUBLIC} sport=0 dport=25" in exp, exp
            assert d.step(f"cmd RETR {FILE}").startswith("150")
        kernel = ls.accepted(expect=1)
        assert len(kernel) == 1 and kernel[0].startswith(f"accepted {CLIENTS[0]}:25 from {EVIL}:"), kernel

        with alg(lab, lab.gw), Driver(lab, lab.client, EVIL, CLIENTS[0]) as d:
            login(d)
            assert d.step(f"cmd PORT {port_arg(*target)}").startswith("200")  # this server takes any PORT
            assert lab.expectations(lab.gw) == []
            r = d.step(f"cmd RETR {FILE}")
            assert r.startswith("425"), r  # it tried, nothing answered
            assert f"{GW_PUBLIC}:25" in r
            assert d.step(f"port-retr {FILE}") == want_file(lab)  # the same session, a real data port
            assert no_pinholes_soon(lab, lab.gw)
            log = lab.ftpalg_log(lab.gw)
        assert ls.accepted() == kernel  # nothing since the kernel's helper was removed
    assert f"PORT {CLIENTS[0]}:25: port 25 is below 1024" in log, log


# ---- 2. FTP bounce to a third inside host ---------------------------------------------------
def test_bounce_to_the_other_inside_client_reaches_nothing(lab, evil_outside):
    """An inside client announces the OTHER inside client's address and a high port where a
    listener waits: nothing reaches it. The host itself announcing that port is let in (the
    listener sees what a pinhole admits)."""
    victim = (CLIENTS[1], 41500)
    with Listener(lab, lab.client, [victim], name="third-host") as ls, alg(lab, lab.gw):
        with Driver(lab, lab.client, EVIL, CLIENTS[0]) as d:
            login(d)
            assert d.step(f"cmd PORT {port_arg(*victim)}").startswith("200")
            assert lab.expectations(lab.gw) == []
            r = d.step(f"cmd RETR {FILE}")
            assert r.startswith("425") and f"{GW_PUBLIC}:41500" in r, r
            assert ls.accepted() == []
            assert d.step(f"port-retr {FILE}") == want_file(lab)
        # contrast: the owner of that address announcing it gets the connection, once
        with Driver(lab, lab.client, EVIL, CLIENTS[1]) as d:
            login(d)
            assert d.step(f"cmd PORT {port_arg(*victim)}").startswith("200")
            (exp,) = lab.expectations(lab.gw)
            assert f"src={EVIL} dst={GW_PUBLIC} sport=0 dport=41500" in exp, exp
            assert d.step(f"cmd RETR {FILE}").startswith("150")
        seen = ls.accepted(expect=1)
        log = lab.ftpalg_log(lab.gw)
    assert len(seen) == 1 and seen[0].startswith(f"accepted {CLIENTS[1]}:41500 from {EVIL}:"), seen
    assert f"PORT {CLIENTS[1]}:41500: address is not the client's own (FTP bounce)" in log, log


# ---- 3. Another outside client on a passive pinhole -----------------------------------------
def test_second_outside_client_cannot_use_a_passive_pinhole(lab):
    """A legitimate passive session to the inside pyftpdlib behind gw2; a second outside
    client tries its announced port first: refused; the first client transfers fine, once."""
    with alg(lab, lab.gw2):
        check_pasv_pinhole_admits_only_the_announced_client(lab, "a second outside client on the pinhole")
        log = lab.ftpalg_log(lab.gw2)
    assert f"pinhole open id=1 from={OUTSIDE_CLIENTS[0]} to={PUBLIC_OF['pyftpdlib']}:" in log, log


# ---- 4. A 227 sent by the client ------------------------------------------------------------
def server_pasv_opens(lab: Lab, d: Driver, pub: str, port: int, client: str) -> None:
    """The contrast: the hostile inside server's own answer to PASV names ``port``, which
    opens it to ``client`` (connected: the listener there records it); then the session's
    real passive transfer works."""
    assert f"({port_arg(pub, port)})" in d.step("cmd PASV")
    (exp,) = lab.expectations(lab.gw2)
    assert f"src={client} dst={pub} sport=0 dport={port}" in exp, exp
    assert d.step(f"connect {pub} {port}").startswith("connected")
    assert d.step(f"pasv-retr {FILE}") == want_file(lab)


@pytest.mark.parametrize("queue", QUEUES)
def test_passive_reply_forged_by_the_client_opens_nothing(lab, queue):
    """An outside client sends ``227 Entering Passive Mode (...)`` as a command, naming the
    inside server's real and public address at a port where a listener waits: nothing is
    expected, nothing connects. Selected queueing (the default): the kernel never queues
    that line (no address verb), gw2's queue count does not move. All queued: ftpalg reads it
    and refuses it as a reply sent by the client. The same port in the server's answer to
    the client's PASV is let in (the listener sees what a pinhole admits)."""
    addr, pub = INSIDE_SERVERS["pyftpdlib"], PUBLIC_OF["pyftpdlib"]
    target = (addr, 40007)
    with (hostile_inside_server(lab, pasv=(pasv_text(*target), "real")),
          Listener(lab, lab.inside, [target], name="inside-40007") as ls, alg(lab, lab.gw2, "--queue", queue),
          Driver(lab, lab.server, pub, OUTSIDE_CLIENTS[0]) as d):
        login(d)
        before = queued(lab, lab.gw2)
        for named in (addr, pub):
            assert d.step(f"cmd {pasv_text(named, 40007)}").startswith("502")  # the server: not a command
            assert lab.expectations(lab.gw2) == []
            assert d.step(f"connect {pub} 40007").startswith("failed")
        forged = queued(lab, lab.gw2) - before  # the two lines and their replies (502, no passive code)
        assert ls.accepted() == []
        server_pasv_opens(lab, d, pub, 40007, OUTSIDE_CLIENTS[0])
        seen = ls.accepted(expect=1)
        log = lab.ftpalg_log(lab.gw2)
    assert len(seen) == 1 and seen[0].startswith(f"accepted {addr}:40007 from {OUTSIDE_CLIENTS[0]}:"), seen
    if queue == "all":
        assert forged >= 2, forged
        assert "unsolicited" in log and "sent by the client: opens nothing" in log, log
    else:
        assert forged == 0 and "unsolicited" not in log, (forged, log)


# ---- 5. A hostile inside server -------------------------------------------------------------
def hostile_server_session(lab: Lab, pub: str, other_pub: str,
                           gw: str | None = None) -> dict[str, tuple[str, list[str], list[str]]]:
    """An outside client of the hostile inside server: after each of its 227s, the
    expectations at that moment and the client's connection attempts to what it names.
    ``gw``: the gateway's ftpalg runs: also, after the unsolicited 227, how many packets its
    kernel queued since the session began and how many connections ftpalg tracks."""
    out = {}
    with Driver(lab, lab.server, pub, OUTSIDE_CLIENTS[0]) as d:
        before = queued(lab, gw) if gw else 0
        assert d.step("cmd USER anonymous").startswith("331")
        assert d.step("cmd PASS x").startswith("230")
        r = d.step("reply")  # the 227 the server sent right after its 230, answering nothing
        out["unsolicited"] = (r, lab.expectations(lab.gw2), [d.step(f"connect {pub} 40008")])
        if gw:
            out["reached"] = ("", [], [str(queued(lab, gw) - before), str(tracked(lab, gw))])
        r = d.step("cmd PASV")  # answered with another inside host
        out["other host"] = (r, lab.expectations(lab.gw2),
                             [d.step(f"connect {pub} 40009"), d.step(f"connect {other_pub} 40009")])
        r = d.step("cmd PASV")  # answered with its own port 22
        out["port 22"] = (r, lab.expectations(lab.gw2), [d.step(f"connect {pub} 22")])
        out["legitimate"] = (d.step(f"pasv-retr {FILE}"), [], [])
    return out


@pytest.mark.parametrize("queue", QUEUES)
def test_hostile_inside_server_opens_no_path_to_other_hosts_or_services(lab, queue):
    """The inside server behind gw2 sends an unsolicited 227 (its own address, a high port),
    answers PASV with a 227 naming another inside host, then one naming its own port 22: the
    outside client's connections to those get nowhere. The kernel helper opens the
    unsolicited one and port 22 (the listener records both); ftpalg opens nothing: it reads
    the unsolicited 227 and refuses it (selected, the default: the only segment of the
    connection the kernel queued so far)."""
    addr, pub = INSIDE_SERVERS["pyftpdlib"], PUBLIC_OF["pyftpdlib"]
    other, other_pub = INSIDE_SERVERS["proftpd"], PUBLIC_OF["proftpd"]
    unsolicited, third, service = (addr, 40008), (other, 40009), (addr, 22)
    script = {"after_login": (pasv_text(*unsolicited),), "pasv": (pasv_text(*third), pasv_text(*service), "real")}
    with (hostile_inside_server(lab, **script),
          Listener(lab, lab.inside, [unsolicited, third, service], name="inside-targets") as ls):
        with kernel_helper(lab, lab.gw2):
            kernel = hostile_server_session(lab, pub, other_pub)
        kernel_seen = ls.accepted(expect=2)
        assert kernel["unsolicited"][2][0].startswith("connected"), kernel
        assert kernel["port 22"][2][0].startswith("connected"), kernel
        assert sorted(line.split()[1] for line in kernel_seen) == [f"{addr}:22", f"{addr}:40008"], kernel_seen
        assert kernel["legitimate"][0] == want_file(lab)

        with alg(lab, lab.gw2, "--queue", queue):
            res = hostile_server_session(lab, pub, other_pub, lab.gw2)
        log = lab.ftpalg_log(lab.gw2)  # with the counters ftpalg logs on exit
        assert ls.accepted() == kernel_seen, res  # nothing new
    for what in ("unsolicited", "other host", "port 22"):
        reply, exps, tries = res[what]
        assert reply.startswith("227") and pub.replace(".", ",") not in reply, (what, reply)  # not rewritten
        assert exps == [], (what, exps)
        assert all(t.startswith("failed") for t in tries), (what, tries)
    assert res["legitimate"][0] == want_file(lab)
    assert f"PASV {other}:40009: address is neither the server's nor the public address" in log, log
    # each reason is logged once per connection; the counters ftpalg logs on exit have them all
    assert counters(log)["refused"] == 2, log
    reached, flows = map(int, res["reached"][2])
    # read and refused: all queued, or selected, where it is the only segment of the connection
    # queued so far (the client sent no address command) and ftpalg follows the connection from
    # it (a conntrack look-up by its reply tuple) only to find that no PASV asked for it
    assert "unsolicited" in log and "227 answers no command, not PASV: opens nothing" in log, log
    assert counters(log)["unsolicited"] == 1 and flows == 1, log
    if queue == "selected":
        assert reached == 1, (reached, log)


# ---- 6. Forged server segments (nmap firewall-bypass.nse) -----------------------------------
def forge(lab: Lab, text: str, *specs: str) -> None:
    """Send forged segments from the internet into gw2's outside interface."""
    mac = mac_of(lab, lab.gw2, "go")
    lab.ns(lab.server, [sys.executable, "-m", "ftpalg.lab.hostile", "frame", "s1", mac, text, *specs])


def test_forged_server_segment_of_no_connection_opens_nothing(lab):
    """An outside attacker sends gw2 segments that look like an inside server's 227 reply
    (naming the server and a port where a listener waits) on connections that do not exist,
    then connects to that port: nothing is expected, nothing connects. The segments reach
    the gateway (a capture on its outside interface) but not ftpalg: their source is not
    routed through that interface (the reverse-path check) or their connection's original
    port is not a control port: gw2's queue count does not move. With that check deleted and
    every segment queued (selected queueing would not queue the one to port 21 either: it
    is the original direction of a connection, with no address verb), the one to port 21
    reaches ftpalg, is read as a 227 sent by a client and still opens nothing. The server's
    own answer to PASV naming that port opens it (the listener sees what a pinhole
    admits)."""
    addr, pub = INSIDE_SERVERS["pyftpdlib"], PUBLIC_OF["pyftpdlib"]
    target, me = (addr, 40010), OUTSIDE_CLIENTS[1]
    text = pasv_text(*target)
    forged = [(addr, 40123), (pub, 40124), (addr, 21)]  # source (port 21), destination port at ``me``
    specs = [f"{a}:21>{me}:{port}" for a, port in forged]
    with (hostile_inside_server(lab, pasv=(text, "real")),
          Listener(lab, lab.inside, [target], name="inside-40010") as ls):
        with alg(lab, lab.gw2):
            with arrivals(lab, lab.gw2, "forged-no-connection") as wire:
                before = queued(lab, lab.gw2)
                forge(lab, text, *specs)
                assert lab.expectations(lab.gw2) == []
                assert probe(lab, pub, 40010, me).startswith("refused")
                assert queued(lab, lab.gw2) == before  # not one was queued
            assert ls.accepted() == []
            with Driver(lab, lab.server, pub, me) as d:  # a legitimate session of the same client
                login(d)
                server_pasv_opens(lab, d, pub, 40010, me)
            seen = ls.accepted(expect=1)
        log = lab.ftpalg_log(lab.gw2)
        assert all(arrived(wire, a, me, text) for a, _ in forged), wire  # they reached the gateway ...
        assert "unsolicited" not in log and "refused" not in log, log  # ... and not ftpalg
        assert len(seen) == 1 and seen[0].startswith(f"accepted {addr}:40010 from {me}:"), seen
        assert f"pinhole open id=1 from={me} to={pub}:40010 " in log and "id=3" not in log, log  # and the transfer's
        with alg_without_reverse_path_check(lab, lab.gw2, *ALL):
            forge(lab, text, *specs)
            assert lab.expectations(lab.gw2) == []
            assert probe(lab, pub, 40010, me).startswith("refused")
        read = lab.ftpalg_log(lab.gw2)
        assert ls.accepted() == seen
    # without the check: only the segment to port 21 is queued (conntrack's original
    # destination port); read as a 227 sent by a client, it opens nothing
    assert f"unsolicited flow={addr}:21>{me}:21: b'{text}\\r\\n' sent by the client: opens nothing" in read, read
    assert counters(read)["packets"] == 1 and counters(read)["unsolicited"] == 1, read
    assert "pinhole open" not in read, read


def nmap_session(lab: Lab, pub: str, target: tuple[str, int], after: str = "",
                 count: bool = False) -> tuple[str, list[str], str, int]:
    """nmap's firewall-bypass: the attacker's own control connection, then a segment forged
    as the server's next one (exact sequence numbers) carrying a 227 for ``target``, sent
    into gw2's outside interface; then a connection to that port. ``after``: a command
    the attacker sends just before (the server cannot answer it first). Last, if ``count``
    (ftpalg runs): how many packets gw2's kernel queued meanwhile, before the connection
    closes (else -1)."""
    mac = mac_of(lab, lab.gw2, "go")
    with Driver(lab, lab.server, pub, OUTSIDE_CLIENTS[0]) as d:
        before = queued(lab, lab.gw2) if count else 0
        login(d)
        verb = f"spoof-after {after}" if after else "spoof"
        r = d.step(f"{verb} s1 {mac} {target[0]} 21 {pasv_text(*target)}")
        require(r.startswith("spoofed"), r)
        exps = lab.expectations(lab.gw2)
        connect = d.step(f"connect {pub} {target[1]}")
        return exps[0] if exps else "", exps, connect, queued(lab, lab.gw2) - before if count else -1


def test_nmap_firewall_bypass_unsolicited_227_opens_nothing(lab):
    """nmap firewall-bypass.nse against gw2: the kernel helper takes the forged 227 and the
    attacker reaches the inside server's port 40011. With ftpalg the segment reaches the
    gateway (a capture on its outside interface), not ftpalg (its source is not routed
    through that interface: gw2's queue count does not move), and nothing opens. With that
    check deleted and every segment queued it reaches ftpalg, which reads it as a 227 that
    answers no command and still opens nothing. (Selected queueing would queue it, a server
    segment with 227, on a connection not tracked yet: it passes unread.)"""
    addr, pub = INSIDE_SERVERS["vsftpd"], PUBLIC_OF["vsftpd"]
    target, me = (addr, 40011), OUTSIDE_CLIENTS[0]
    with Listener(lab, lab.inside, [target], name="inside-40011") as ls:
        with kernel_helper(lab, lab.gw2):
            exp, _, connect, _ = nmap_session(lab, pub, target)
        assert f"src={me} dst={pub} sport=0 dport=40011" in exp and "helper=ftp" in exp, exp
        assert connect.startswith("connected"), connect
        kernel = ls.accepted(expect=1)
        assert len(kernel) == 1 and kernel[0].startswith(f"accepted {addr}:40011 from {me}"), kernel

        with alg(lab, lab.gw2):
            with arrivals(lab, lab.gw2, "nmap-unsolicited") as wire:
                _, exps, connect, reached = nmap_session(lab, pub, target, count=True)
            assert reached == 0, reached  # not queued (nor the attacker's login)
            assert exps == [] and connect.startswith("failed"), (exps, connect)
            with Driver(lab, lab.server, pub, me) as d:
                login(d)
                assert d.step(f"pasv-retr {FILE}") == want_file(lab)
        log = lab.ftpalg_log(lab.gw2)
        assert arrived(wire, addr, me, pasv_text(*target)), wire  # it reached the gateway ...
        assert "unsolicited" not in log, log  # ... and not ftpalg
        assert "pinhole open id=1 " in log and "id=2" not in log, log  # the legitimate session's only
        with alg_without_reverse_path_check(lab, lab.gw2, *ALL):
            _, exps, connect, _ = nmap_session(lab, pub, target)
            assert exps == [] and connect.startswith("failed"), (exps, connect)
        read = lab.ftpalg_log(lab.gw2)
        assert ls.accepted() == kernel
    # without the check ftpalg reads it: a reply that answers nothing
    (line,) = [line for line in read.splitlines() if " unsolicited " in line]
    assert f"flow={me}:" in line and f">{pub}:21: 227 answers no command, not PASV: opens nothing" in line, read
    assert counters(read)["unsolicited"] == 1 and "pinhole open" not in read, read


def legitimate_transfer(lab: Lab, ns: str, host: str, source: str, step: str) -> None:
    """A legitimate session in the same run works (``step``: ``pasv-retr`` or ``port-retr``)."""
    with Driver(lab, ns, host, source) as d:
        login(d)
        require(d.step(f"{step} {FILE}") == want_file(lab), "legitimate transfer")


@contextlib.contextmanager
def rp_filter_set(lab: Lab, gw: str, value: int) -> Iterator[None]:
    """The kernel's rp_filter of the gateway's outside interface (``all`` and ``go``) set to
    ``value`` for the block, 0 again (the lab's setting) after it."""
    names = [f"net.ipv4.conf.{d}.rp_filter" for d in ("all", "go")]
    lab.ns(gw, ["sysctl", "-qw", *[f"{n}={value}" for n in names]])
    try:
        yield
    finally:
        lab.ns(gw, ["sysctl", "-qw", *[f"{n}=0" for n in names]])


@pytest.mark.parametrize("rp_filter", [0, 1])
def test_nmap_firewall_bypass_after_the_attackers_own_pasv_opens_nothing(lab, rp_filter):
    """nmap's forged 227, made an answer: the attacker sends PASV itself (with a zero window:
    the real server cannot answer first), then the forged 227 naming the inside server's port
    40012. Nothing may open: the segment came in from the internet, not from the server.
    Both forged segments reach the gateway (a capture on its outside interface). With the
    queue rule's reverse-path check deleted, the same forgery opens the port to the attacker
    (the listener records it), whatever the kernel's rp_filter."""
    addr, pub = INSIDE_SERVERS["vsftpd"], PUBLIC_OF["vsftpd"]
    target, me = (addr, 40012), OUTSIDE_CLIENTS[0]
    with Listener(lab, lab.inside, [target], name="inside-40012") as ls:
        with alg(lab, lab.gw2):
            legitimate_transfer(lab, lab.server, pub, OUTSIDE_CLIENTS[1], "pasv-retr")
            with rp_filter_set(lab, lab.gw2, rp_filter), arrivals(lab, lab.gw2, f"nmap-pasv-{rp_filter}") as wire:
                exp, exps, connect, _ = nmap_session(lab, pub, target, after="PASV")
            log = lab.ftpalg_log(lab.gw2)
            seen = ls.accepted()
        assert seen == [] and exps == [] and connect.startswith("failed"), (seen, exp, connect, log)
        assert arrived(wire, me, pub, "PASV") and arrived(wire, addr, me, pasv_text(*target)), wire
        assert "40012" not in log, log
        with alg_without_reverse_path_check(lab, lab.gw2), rp_filter_set(lab, lab.gw2, rp_filter):
            exp, exps, connect, _ = nmap_session(lab, pub, target, after="PASV")
        opened = ls.accepted(expect=1)
    assert f"src={me} dst={pub} sport=0 dport=40012" in exp and connect.startswith("connected"), (exp, connect)
    assert len(opened) == 1 and opened[0].startswith(f"accepted {addr}:40012 from {me}:"), opened


def forge_clients_port(lab: Lab, srv: ScriptedServer, port: int) -> str:
    """A session of the inside client with the outside scripted server, which forges the
    client's ``PORT 10,0,0,2,...`` naming ``port`` and connects there: what it said."""
    with Driver(lab, lab.client, EVIL, CLIENTS[0]) as d:
        login(d)
        # not waited for at the client: the server then acknowledges bytes the client never sent
        require(d.step(f"send SITE FORGE {port}") == "sent", "SITE FORGE")
        return server_said(srv, f"200 forged {forged_port(port)}; connect")


def forged_port(port: int) -> str:
    return f"PORT {port_arg(CLIENTS[0], port)}"


@pytest.mark.parametrize("rp_filter", [0, 1])
def test_server_forging_its_clients_port_reaches_nothing(lab, evil_outside, rp_filter):
    """The same forgery the other way round, at gw1: the outside server forges its client's
    next segment (source 10.0.0.2 and the client's port, exact sequence numbers) carrying
    ``PORT 10,0,0,2,156,77`` into gw1's outside interface, then connects to the gateway's
    public address at port 40013, where a service of the client listens. Nothing may open:
    the segment came in from the internet, not from the client. The forged segment reaches
    the gateway (a capture on its outside interface); with the queue rule's reverse-path
    check deleted, the same forgery opens the port to the server, whatever the kernel's
    rp_filter."""
    target = (CLIENTS[0], 40013)
    with Listener(lab, lab.client, [target], name="client-40013") as ls:
        with alg(lab, lab.gw):
            legitimate_transfer(lab, lab.client, EVIL, CLIENTS[0], "port-retr")
            with rp_filter_set(lab, lab.gw, rp_filter), arrivals(lab, lab.gw, f"forge-port-{rp_filter}") as wire:
                r = forge_clients_port(lab, evil_outside, 40013)
            log = lab.ftpalg_log(lab.gw)
            seen = ls.accepted()
        assert f"connect {GW_PUBLIC}:40013 failed" in r and seen == [], (seen, r, log)
        assert arrived(wire, CLIENTS[0], EVIL, forged_port(40013)), wire
        assert "40013" not in log, log
        with alg_without_reverse_path_check(lab, lab.gw), rp_filter_set(lab, lab.gw, rp_filter):
            r = forge_clients_port(lab, evil_outside, 40013)
        opened = ls.accepted(expect=1)
    assert f"connect {GW_PUBLIC}:40013 ok b'hello\\n'" in r, r
    assert len(opened) == 1 and opened[0].startswith(f"accepted {CLIENTS[0]}:40013 from {EVIL}:"), opened
