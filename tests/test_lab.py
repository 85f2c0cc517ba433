"""The lab's topologies without any ALG: what works and what fails through each gateway.

Client NAT (gw1) lets passive mode through and breaks active mode; server DNAT (gw2)
forwards the control port only, so logins work and both modes fail; the stateful IPv6
gateway without NAT (gw2) accepts port 21 and drops data connections. These are the
baselines ftpalg must change, and nothing more."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from typing import Any

import pytest

from ftpalg.lab.lab import (
    BOTH_NAT_PUBLIC,
    CLIENTS,
    CLIENTS6,
    FORWARDED_PORT,
    GW2_INSIDE,
    INSIDE_SERVERS,
    INSIDE_SERVERS6,
    OUTSIDE_CLIENTS,
    OUTSIDE_CLIENTS6,
    PUBLIC_OF,
    SERVERS,
    SERVERS6,
    Lab,
    LabError,
    run,
    sha256,
)

pytestmark = pytest.mark.netns

BANNER = {"vsftpd": "vsFTPd", "pyftpdlib": "pyftpdlib", "proftpd": "ProFTPD", "pure-ftpd": "Pure-FTPd"}

# Runs every job at once (threads), prints one result per job: the SHA-256 of small.txt,
# "LOGIN <banner>" for a login, or "FAIL <why>".
PROBE = r"""
import contextlib, ftplib, hashlib, json, sys, threading

class FTP(ftplib.FTP):
    epsv = False

    def makepasv(self):
        if self.epsv:
            return ftplib.parse229(self.sendcmd("EPSV"), self.sock.getpeername())
        return super().makepasv()  # PASV, to the control connection's peer (ftplib's default)

def one(job, out):
    ftp = FTP(timeout=job["timeout"])
    try:
        src = job.get("source")
        ftp.connect(job["host"], job.get("port", 21), source_address=(src, 0) if src else None)
        ftp.login()
        ftp.voidcmd("NOOP")
        ftp.pwd()
        if job["mode"] == "login":
            out.append("LOGIN " + ftp.getwelcome().replace("\n", " "))
        else:
            ftp.set_pasv(job["mode"] != "active")  # active: PORT (IPv4) or EPRT (IPv6)
            ftp.epsv = job["mode"] == "epsv"
            h = hashlib.sha256()
            ftp.retrbinary("RETR small.txt", h.update)
            out.append(h.hexdigest())
        with contextlib.suppress(Exception):
            ftp.quit()
    except Exception as e:
        out.append(f"FAIL {type(e).__name__}: {e}")
    finally:
        ftp.close()

jobs = json.loads(sys.argv[1])
outs = [[] for _ in jobs]
threads = [threading.Thread(target=one, args=(j, o)) for j, o in zip(jobs, outs)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps([o[0] if o else "FAIL no result" for o in outs]))
"""


def job(host: str, mode: str, source: str, port: int = 21) -> dict[str, Any]:
    return {"host": host, "mode": mode, "source": source, "port": port}


def check(lab: Lab, ns: str, cases: list[tuple[str, dict[str, Any], str]]) -> None:
    """Run the cases' jobs in ``ns`` at once; each expects "data" (the file arrives intact),
    "login" (optionally "login:<kind>": that server's banner) or "fail"."""
    jobs = [{**j, "timeout": 2.0 if expect == "fail" else 10.0} for _, j, expect in cases]  # a DROP: a timeout
    res = lab.ns(ns, [sys.executable, "-c", PROBE, json.dumps(jobs)], check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    want = sha256(lab.files / "small.txt")
    wrong = []
    for (label, _, expect), got in zip(cases, json.loads(res.stdout), strict=True):
        if expect == "data":
            ok = got == want
        elif expect.startswith("login"):
            kind = expect.partition(":")[2]
            ok = got.startswith("LOGIN") and BANNER.get(kind, "") in got
        else:
            ok = got.startswith("FAIL")
        if not ok:
            wrong.append(f"{label}: expected {expect}, got {got[:150]}")
    assert not wrong, "\n".join(wrong)


def test_client_nat_passes_passive_and_breaks_active(lab):
    """(a) Inside clients behind gw1 (MASQUERADE, NAT66): EPSV and PASV downloads from every
    outside server work, IPv4 and IPv6; active mode fails."""
    cases = []
    for kind, addr in SERVERS.items():
        for mode, expect in (("epsv", "data"), ("pasv", "data"), ("active", "fail")):
            cases.append((f"{kind} {addr} {mode}", job(addr, mode, CLIENTS[0]), expect))
    for kind, addr in SERVERS6.items():
        for mode, expect in (("epsv", "data"), ("active", "fail")):
            cases.append((f"{kind} {addr} {mode}", job(addr, mode, CLIENTS6[0]), expect))
    check(lab, lab.client, cases)


def test_server_dnat_forwards_the_control_port_only(lab):
    """(b) An outside client reaches every inside server's login through its public address
    at gw2, but neither passive (the data port is not forwarded) nor active (the server may
    not connect out) transfers work. (c) The forwarded port 2121 and the address whose
    connections gw2 both DNATs and SNATs reach their servers too."""
    client = OUTSIDE_CLIENTS[0]
    cases = []
    for kind, addr in PUBLIC_OF.items():
        cases.append((f"{kind} {addr} login", job(addr, "login", client), f"login:{kind}"))
        for mode in ("epsv", "pasv", "active"):
            cases.append((f"{kind} {addr} {mode}", job(addr, mode, client), "fail"))
    if "pyftpdlib" in INSIDE_SERVERS:
        cases.append(("forwarded port", job(FORWARDED_PORT[0], "login", OUTSIDE_CLIENTS[1], FORWARDED_PORT[1]),
                      "login:pyftpdlib"))
    if "vsftpd" in INSIDE_SERVERS:
        cases.append(("both NATs", job(BOTH_NAT_PUBLIC, "login", client), "login:vsftpd"))
    check(lab, lab.server, cases)
    if "vsftpd" in INSIDE_SERVERS:
        # The server saw gw2's inside address, not the client's.
        ct = lab.ns(lab.gw2, ["conntrack", "-L", "-p", "tcp", "--orig-dst", BOTH_NAT_PUBLIC]).stdout
        assert f"src={INSIDE_SERVERS['vsftpd']} dst={GW2_INSIDE} sport=21" in ct, ct


def test_double_nat(lab):
    """(d) Inside client -> gw1 MASQUERADE -> gw2 DNAT -> inside server: login works,
    passive transfers do not."""
    cases = []
    for kind, addr in PUBLIC_OF.items():
        cases.append((f"{kind} {addr} login", job(addr, "login", CLIENTS[0]), f"login:{kind}"))
        cases.append((f"{kind} {addr} epsv", job(addr, "epsv", CLIENTS[0]), "fail"))
    check(lab, lab.client, cases)


def test_ipv6_stateful_gateway_without_nat(lab):
    """(e) IPv6 from the internet to the inside servers' global addresses: port 21 is let
    in, data connections in either direction are dropped."""
    client = OUTSIDE_CLIENTS6[0]
    cases = []
    for kind, addr in INSIDE_SERVERS6.items():
        cases.append((f"{kind} {addr} login", job(addr, "login", client), f"login:{kind}"))
        for mode in ("epsv", "active"):
            cases.append((f"{kind} {addr} {mode}", job(addr, mode, client), "fail"))
    check(lab, lab.server, cases)


def test_inside_servers_cannot_connect_out(lab):
    """Nothing new leaves gw2's inside, IPv4 or IPv6: only what FTP announces may be opened."""
    code = textwrap.dedent("""
        import socket, sys, threading
        out = []
        def connect(dst, src):
            try:
                socket.create_connection((dst, 22), 1.5, source_address=(src, 0))
                out.append(f"{dst} connected")
            except OSError as e:
                out.append(f"{dst} {type(e).__name__}")
        args = sys.argv[1:]
        threads = [threading.Thread(target=connect, args=args[i:i + 2]) for i in (0, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(*out, sep=chr(10))  # after both: two threads printing at once interleave their words
    """)
    src4, src6 = next(iter(INSIDE_SERVERS.values())), next(iter(INSIDE_SERVERS6.values()))
    res = lab.ns(lab.inside, [sys.executable, "-c", code, OUTSIDE_CLIENTS[0], src4, OUTSIDE_CLIENTS6[0], src6])
    want = sorted(f"{dst} TimeoutError" for dst in (OUTSIDE_CLIENTS[0], OUTSIDE_CLIENTS6[0]))
    assert sorted(res.stdout.splitlines()) == want


def test_down_leaves_nothing():
    """(f) down() removes every namespace, process and file of the lab, also when up()
    fails after the servers started."""

    class Broken(Lab):
        fail = False
        pids: list[int] = []

        def start_servers(self) -> None:
            super().start_servers()
            self.pids = [int(pid) for n in self.namespaces for pid in run(["ip", "netns", "pids", n]).stdout.split()]
            if self.fail:
                raise LabError("injected failure")

    lab = Broken(f"fl{os.getpid()}")
    for fail in (False, True):
        lab.fail = fail
        if fail:
            with pytest.raises(LabError, match="injected"):
                lab.up()
        else:
            lab.up()
            assert len(lab.leftovers()) == 5
            lab.down()
        assert lab.pids  # the servers and their helpers
        assert lab.leftovers() == [] and not lab.exists()
        assert not lab.state.exists()
        alive = [pid for pid in lab.pids if os.path.exists(f"/proc/{pid}")]
        assert not alive, alive
