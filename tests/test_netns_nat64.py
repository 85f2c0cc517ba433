"""NAT64 end to end (issue 17, RFC 6384): IPv6-only clients reach IPv4-only servers through
Tayga and MASQUERADE of its pool (``ftpalg.lab.nat64``), every real client in its IPv6
modes, the lab's four servers and Twisted's, which has no EPSV.

The tests that need no ALG come first: they pin down what breaks without one (the issue's
findings). The module-scoped ``alg`` fixture then runs ``ftpalg run`` with the documented
NAT64 option only (``NAT64_OPTIONS``) for the rest of the module: EPSV to the server without
EPSV, EPRT |2| in active mode, ALGS (216) and EPSV ALL (504, the session goes on) for every
client that can send them, downloads and uploads checked by SHA-256, and pinholes that only
the announcing client's server can use."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from needs import need

from ftpalg.lab import clients
from ftpalg.lab.lab import sha256
from ftpalg.lab.nat64 import (
    CLIENTS6,
    FILE,
    GW_PUBLIC,
    MISANNOUNCING,
    NAT64_OPTIONS,
    POOL,
    SERVERS,
    SERVERS6,
    UNRELATED,
    Cell,
    Nat64Lab,
    run_cell,
    run_cells,
    synthesized,
)
from ftpalg.lab.servers import NO_EPSV_KIND, SYSTEM_PYTHON
from netns_checks import PROBE, no_pinholes_soon

pytestmark = pytest.mark.netns

NO_EPSV = NO_EPSV_KIND
RFC_MODES = ("EPSV", "EPRT")  # what RFC 6384 translates; LPSV/LPRT go beyond it (issue 17)


@pytest.fixture(scope="module")
def lab():
    need(shutil.which("tayga"), "tayga (Debian package tayga)")
    need(subprocess.run([SYSTEM_PYTHON, "-c", "import twisted.protocols.ftp"], capture_output=True).returncode == 0
         if os.path.exists(SYSTEM_PYTHON) else False, "Twisted for the system's python3 (python3-twisted)")
    lab = Nat64Lab(f"f6{os.getpid()}")
    lab.up()
    yield lab
    lab.down()
    assert not lab.exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(lab.state) not in ps  # tayga (its configuration is there) and the servers are gone


def talk(lab: Nat64Lab, server: str, *steps: str, source: str = CLIENTS6[0]) -> list[tuple[str, str]]:
    """``python -m ftpalg.lab.nat64 talk`` from the client namespace: (step, result) pairs."""
    res = lab.ns(lab.client, [sys.executable, "-m", "ftpalg.lab.nat64", "talk", SERVERS6[server], *steps,
                              "--source", source], check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    pairs = [tuple(line.split("\t", 1)) for line in res.stdout.splitlines()]
    assert [p[0] for p in pairs] == list(steps), res.stdout
    return pairs  # type: ignore[return-value]


def results(pairs: list[tuple[str, str]]) -> list[str]:
    return [r for _, r in pairs]


def kinds(*modes: str) -> list[clients.ClientKind]:
    return [k for k in clients.kinds(family=6) if k.mode in modes]


def failed(outcomes: dict[Cell, tuple[bool, str]]) -> list[str]:
    return [f"{c.label}: {why}" for c, (ok, why) in outcomes.items() if not ok]


# ---- without ftpalg: what breaks (the findings) -------------------------------------------
def test_lab_is_an_ipv6_only_client_behind_tayga(lab):
    """The client has no IPv4 address; the servers see the gateway's public IPv4 address (the
    pool MASQUERADEd), reached at their synthesised addresses."""
    assert "inet " not in lab.ns(lab.client, ["ip", "-4", "addr", "show", "dev", "c0"]).stdout
    assert SERVERS6["vsftpd"] == "2001:db8:64::cb00:7102" == synthesized("203.0.113.2")
    assert talk(lab, "vsftpd", "CMD EPSV", "GET " + FILE)[1][1] == sha256(lab.files / FILE)  # the control case
    ct = lab.ns(lab.gw, ["conntrack", "-L", "-f", "ipv4", "-p", "tcp", "--dport", "21"], check=False).stdout
    pool = POOL.rsplit(".", 1)[0] + "."
    assert re.search(rf"src={re.escape(pool)}\d+ dst={SERVERS['vsftpd']} .* src={SERVERS['vsftpd']} "
                     rf"dst={GW_PUBLIC} ", ct), ct


def test_without_alg_epsv_to_a_server_without_epsv_fails_502(lab):
    (epsv, get) = talk(lab, NO_EPSV, "CMD EPSV", "GET " + FILE)
    assert epsv[1].startswith("502 "), epsv
    assert get[1].startswith("ERROR 502"), get
    ok, why = run_cell(lab, Cell(clients.ClientKind("ftplib", "EPSV"), NO_EPSV), "without")
    assert not ok and why.startswith("502"), why


def test_without_alg_eprt_ipv6_fails_500(lab):
    ok, why = run_cell(lab, Cell(clients.ClientKind("ftplib", "EPRT"), "vsftpd"), "without")
    assert not ok and why == "500 Bad EPRT protocol.", why


def test_without_alg_algs_and_epsv_all_reach_the_server(lab):
    assert results(talk(lab, "vsftpd", "CMD ALGS STATUS64", "CMD EPSV ALL")) == [
        "500 Unknown command.", "200 EPSV ALL ok."]
    assert results(talk(lab, NO_EPSV, "CMD ALGS STATUS64"))[0].startswith("502 ")


# ---- with ftpalg run and the NAT64 option -------------------------------------------------------
@pytest.fixture(scope="module")
def alg(lab):
    """``ftpalg run`` with the documented NAT64 option only, for the rest of the module;
    checks that it exits cleanly and leaves the gateway's rules as it found them."""
    before = lab.ruleset()
    p = lab.start_ftpalg(*NAT64_OPTIONS)
    yield p
    rc = lab.stop_ftpalg(p)
    assert rc == 0, lab.ftpalg_log()
    assert lab.ruleset() == before
    assert "Traceback" not in lab.ftpalg_log()


def test_algs_status_disable_enable_per_connection(lab, alg):
    """ALGS answered 216 by ftpalg, never forwarded; DISABLE64 stops the translation on that
    connection only (EPSV reaches the server without EPSV again), ENABLE64 resumes it."""
    want = sha256(lab.files / FILE)
    pairs = talk(lab, NO_EPSV, "CMD ALGS STATUS64", "GET " + FILE, "CMD ALGS DISABLE64", "CMD ALGS STATUS64",
                 "GET " + FILE, "CMD ALGS ENABLE64", "CMD ALGS STATUS64", "GET " + FILE, "CMD PWD")
    r = results(pairs)
    assert r[0].startswith("216 ") and "EPSV" in r[0], pairs
    assert r[1] == want, pairs
    assert r[2].startswith("216 ") and r[3].startswith("216 ") and "NONE" in r[3], pairs
    assert r[4].startswith("ERROR 502"), pairs  # not translated: the server's own answer
    assert r[5].startswith("216 ") and r[6].startswith("216 ") and "EPSV" in r[6], pairs
    assert r[7] == want, pairs
    assert r[8].startswith("257 "), pairs  # replies still in step: none left over from a NOOP
    # another connection at the same time was never disabled
    assert talk(lab, NO_EPSV, "CMD ALGS STATUS64")[0][1].startswith("216 ")


@pytest.mark.parametrize("server", ["vsftpd", NO_EPSV])
def test_epsv_all_is_answered_504_and_the_session_goes_on(lab, alg, server):
    want = sha256(lab.files / FILE)
    r = results(talk(lab, server, "CMD EPSV ALL", "CMD PWD", "GET " + FILE, "CMD EPSV 1", "GET " + FILE + " EPSV 2",
                     "CMD NOOP"))
    assert r[0].startswith("504 "), r
    assert r[1].startswith("257 "), r  # the NOOP that stood for EPSV ALL: its reply not relayed
    assert r[2] == want, r
    assert r[3].startswith("522 "), r  # EPSV <n != 2>: answered by ftpalg
    assert r[4] == want, r  # "EPSV 2": the server's 227 as a 229 (the client parses only that)
    assert r[5].startswith("200"), r


def refused_count(lab: Nat64Lab) -> int:
    """ftpalg's metric of translations refused (a 227 answered 425), read in the gateway."""
    text = lab.ns(lab.gw, [sys.executable, "-c", "import urllib.request; print(urllib.request.urlopen("
                           "'http://127.0.0.1:9121/metrics', timeout=5).read().decode())"]).stdout
    m = re.search(r'^ftpalg_nat64_translations_total\{kind="refused"\} (\S+)$', text, re.M)
    assert m, text
    return int(float(m.group(1)))


def test_a_227_naming_another_address_is_refused_425_and_counted(lab, alg):
    """A server (pyftpdlib with a wrong masquerade address) answers PASV with an address that
    is not its own: ftpalg answers the client's EPSV 425 instead of a 229 (RFC 6384 allows
    it), counts it, opens nothing, and the session goes on."""
    before = refused_count(lab)
    res = lab.ns(lab.client, [sys.executable, "-m", "ftpalg.lab.nat64", "talk", synthesized(MISANNOUNCING[0]),
                              "CMD EPSV", "CMD NOOP"], check=False)
    epsv, noop = (line.split("\t", 1)[1] for line in res.stdout.splitlines())
    assert epsv.startswith("425 "), res.stdout + res.stderr
    assert noop.startswith("200 "), res.stdout
    assert refused_count(lab) == before + 1
    assert MISANNOUNCING[1].replace(".", ",") in lab.ftpalg_log()  # the 227 it refused
    assert no_pinholes_soon(lab, within=0.5), lab.expectations()


def test_every_client_epsv_and_eprt_download_from_every_server(lab, alg):
    """Every IPv6 client kind that sends EPSV or EPRT, against every server, the one without
    EPSV/EPRT included: the file arrives whole."""
    cells = [Cell(k, s) for k in kinds(*RFC_MODES) for s in SERVERS]
    outcomes = run_cells(lab, cells, "get")
    assert not failed(outcomes), "\n".join(failed(outcomes))


def test_every_client_uploads_through_epsv_and_eprt(lab, alg):
    """Uploads: every client kind that can upload, to the server without EPSV; ftplib to
    every server."""
    cells = [Cell(k, NO_EPSV, put=True) for k in kinds(*RFC_MODES) if k.uploads]
    cells += [Cell(k, s, put=True) for k in kinds(*RFC_MODES) if k.name == "ftplib" for s in SERVERS if s != NO_EPSV]
    outcomes = run_cells(lab, cells, "put")
    assert not failed(outcomes), "\n".join(failed(outcomes))


def test_lpsv_and_lprt_are_translated_too(lab, alg):
    """Beyond RFC 6384 (issue 17, as A10 does): LPSV and LPRT over IPv6, to the server that
    knows neither and to vsftpd."""
    cells = [Cell(k, s, put=put) for k in kinds("LPSV", "LPRT") for s in ("vsftpd", NO_EPSV)
             for put in (False, True)]
    outcomes = run_cells(lab, cells, "long")
    assert not failed(outcomes), "\n".join(failed(outcomes))


EPRT_SESSION = textwrap.dedent("""
    import ftplib, hashlib, socket, sys
    host, me, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ftp = ftplib.FTP(timeout=10)
    ftp.connect(host, 21, source_address=(me, 0))
    ftp.login()
    ftp.voidcmd("TYPE I")
    ls = socket.create_server((me, port), family=socket.AF_INET6, backlog=8)
    ls.settimeout(5)
    print(ftp.sendeprt(me, port), flush=True)
    input()  # the test probes the pinhole meanwhile
    ftp.putcmd("RETR " + sys.argv[4])
    print(ftp.getresp(), flush=True)
    conn, peer = ls.accept()
    h = hashlib.sha256()
    while chunk := conn.recv(65536):
        h.update(chunk)
    conn.close()
    print(peer[0], h.hexdigest(), ftp.voidresp()[:3], flush=True)
    ls.settimeout(1)
    try:
        ls.accept()
        print("second connection accepted", flush=True)
    except OSError:
        print("no second connection", flush=True)
    ftp.quit()
""")

def public_port(exps: list[str], server: str) -> int:
    """The gateway's port in the IPv4 pinhole for ``server``'s data connection."""
    found = [int(m.group(1)) for e in exps
             if (m := re.search(rf"src={re.escape(server)} dst={re.escape(GW_PUBLIC)} sport=0 dport=(\d+)", e))]
    assert len(found) == 1, exps
    return found[0]


def test_eprt_pinhole_is_only_for_the_announcing_clients_server(lab, alg):
    """EPRT |2| from one client: its pinholes admit its server's data connection only. An
    unrelated IPv4 host, and the other IPv6 client (through the translator, at the public
    address's synthesised form), get nothing through it; the server's connection reaches
    the announcing client with the whole file, once."""
    server, me = "vsftpd", CLIENTS6[0]
    assert no_pinholes_soon(lab), lab.expectations()  # none left by earlier tests
    p = subprocess.Popen(["ip", "netns", "exec", lab.client, sys.executable, "-c", EPRT_SESSION, SERVERS6[server], me,
                          "45678", FILE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdin is not None and p.stdout is not None
    try:
        assert p.stdout.readline().startswith("200"), lab.ftpalg_log()[-2000:]
        time.sleep(0.3)
        exps = lab.expectations()
        assert exps and all(f"src={SERVERS[server]} " in e or f"src={SERVERS6[server]} " in e for e in exps), exps
        port = public_port(exps, SERVERS[server])
        probes = [(lab.server, GW_PUBLIC, UNRELATED), (lab.client, synthesized(GW_PUBLIC), CLIENTS6[1])]
        for ns, target, source in probes:
            res = lab.ns(ns, [sys.executable, "-c", PROBE, target, str(port), source], check=False)
            assert res.stdout.startswith("refused"), (source, res.stdout)
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().startswith("150")
        assert p.stdout.readline().split() == [SERVERS6[server], sha256(lab.files / FILE), "226"]
        assert p.stdout.readline().strip() == "no second connection"
        assert p.wait(10) == 0
    finally:
        p.kill()
        p.wait()


BOUNCE = textwrap.dedent("""
    import ftplib, sys
    host, me, victim, port, name = sys.argv[1:6]
    ftp = ftplib.FTP(timeout=3)  # the server's connection, if it gets anywhere, comes at once
    ftp.connect(host, 21, source_address=(me, 0))
    ftp.login()
    ftp.voidcmd("TYPE I")
    try:
        print(ftp.sendcmd(f"EPRT |2|{victim}|{port}|"), flush=True)
        ftp.putcmd("RETR " + name)
        print(ftp.getresp(), flush=True)
        print(ftp.getresp(), flush=True)
    except (ftplib.Error, OSError) as e:
        print(e, flush=True)
""")


def test_second_client_cannot_aim_a_data_connection_at_the_first(lab, alg):
    """The second client announces the first one's address and listening port in EPRT |2|:
    whatever ftpalg and the server make of it, no connection reaches the first client.
    (Measured: the IPv6 side refuses it as a bounce; the IPv4 side translates it to a PORT
    whose pinhole leads to the second client's own pool address, so Tayga delivers to the
    second client, whose IPv6 firewall pinhole was refused: the server's SYNs are dropped.)"""
    victim, attacker, port = CLIENTS6[0], CLIENTS6[1], 46001
    listener = subprocess.Popen(["ip", "netns", "exec", lab.client, sys.executable, "-c", textwrap.dedent(f"""
        import select, socket, sys
        ls = socket.create_server(("{victim}", {port}), family=socket.AF_INET6)
        print("listening", flush=True)
        ready, _, _ = select.select([ls, sys.stdin], [], [], 30)
        print("accepted" if ls in ready else "nothing", flush=True)
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert listener.stdin is not None and listener.stdout is not None
    try:
        assert listener.stdout.readline().strip() == "listening"
        res = lab.ns(lab.client, [sys.executable, "-c", BOUNCE, SERVERS6["vsftpd"], attacker, victim, str(port),
                                  FILE], check=False, timeout=30)
        with contextlib.suppress(BrokenPipeError):  # it is gone if it accepted a connection
            listener.stdin.write("\n")
            listener.stdin.flush()
        assert listener.stdout.readline().strip() == "nothing", res.stdout + res.stderr
    finally:
        listener.kill()
        listener.wait()
