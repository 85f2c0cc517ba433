"""Any firewall that accepts related traffic admits exactly the announced data connections.

ftpalg's pinholes are conntrack expectations, so data connections are RELATED: the admin's
own ``established,related accept`` lets them through, with no rule of ftpalg's in the admin's
tables and no edit by the admin. For each firewall kind of ``ftpalg.lab.firewalls`` (the
lab's iptables-nft rules, a native nftables ruleset, real firewalld with its nftables
backend) both gateways' firewalls are swapped (module-scoped, restored afterwards) and:

* without ftpalg, active mode fails through both gateways and everything IPv6 fails through
  gw2, each after a successful login. Through gw2 the firewall is what stops the data
  connection (IPv6 there has no NAT at all); through gw the servers already refuse the
  private address of PORT/EPRT. Passive mode behind gw's NAT works: the swapped firewall
  passes control connections and outgoing data connections;
* with ``ftpalg run`` (no options) in both gateways, every transfer works, checked by
  SHA-256: PORT, EPRT, PASV, EPSV from the client behind gw's MASQUERADE and to the servers
  behind gw2's DNAT, EPRT and EPSV through gw's NAT66 and through gw2 without NAT, with all
  four servers;
* the port of a 227 through gw2 is open to the client of that session only, and once;
* while ftpalg runs, the admin's tables (everything but ``table inet ftpalg`` and the
  mangle chains iptables-nft holds for ftpalg's queue rule) are exactly as loaded; after it
  exits the whole ruleset is exactly as loaded, and its log holds no traceback.

Transfers of one batch run in parallel."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

import pytest
from needs import need

from ftpalg.lab import firewalls
from ftpalg.lab.lab import (
    CLIENTS,
    CLIENTS6,
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
from netns_checks import check_pasv_pinhole_admits_only_the_announced_client, no_pinholes_soon

pytestmark = pytest.mark.netns

SERVER_KINDS = list(INSIDE_SERVERS)
FILE = "small.txt"
MODES4 = ("PORT", "EPRT", "PASV", "EPSV")
MODES6 = ("EPRT", "EPSV")
PATHS = {
    # path: (gateway role, client namespace suffix, server addresses, client source, modes)
    "client-nat": ("gw", "c", SERVERS, CLIENTS[0], MODES4),
    "server-dnat": ("gw2", "s", PUBLIC_OF, OUTSIDE_CLIENTS[0], MODES4),
    "nat66": ("gw", "c", SERVERS6, CLIENTS6[0], MODES6),
    "ipv6-no-nat": ("gw2", "s", INSIDE_SERVERS6, OUTSIDE_CLIENTS6[0], MODES6),
}


@dataclass(frozen=True)
class Cell:
    path: str
    server: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.path} {self.server} {self.mode}"


def cells(path: str, modes: tuple[str, ...] | None = None) -> list[Cell]:
    return [Cell(path, k, m) for k in SERVER_KINDS for m in (modes or PATHS[path][4])]


# One session: log in, then download FILE in one mode. Prints "logged in" once the control
# connection works, then the SHA-256 of what arrived or the error.
SESSION = textwrap.dedent("""
    import ftplib, hashlib, sys
    from ftpalg.lab.ftpclient import LabFTP
    host, mode, source, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    ftp = LabFTP(mode, 0, timeout)
    ftp.connect(host, 21, source_address=(source, 0))
    ftp.login()
    print("logged in", flush=True)
    h = hashlib.sha256()
    try:
        ftp.retrbinary("RETR " + sys.argv[5], h.update)
        print(h.hexdigest())
        ftp.quit()
    except (ftplib.Error, OSError, EOFError) as e:
        print(f"{type(e).__name__}: {e}")
""")


@dataclass
class Result:
    cell: Cell
    rc: int
    out: str
    err: str

    @property
    def logged_in(self) -> bool:
        return self.out.startswith("logged in")

    @property
    def outcome(self) -> str:
        lines = self.out.splitlines()
        return lines[-1] if len(lines) > 1 else (self.err.strip().splitlines() or ["no output"])[-1]

    def ok(self, lab: Lab) -> bool:
        return self.rc == 0 and self.logged_in and self.outcome == sha256(lab.files / FILE)


def run_cells(lab: Lab, todo: list[Cell], timeout: float = 8.0,
              during: list[dict[str, str]] | None = None) -> list[Result]:
    """Run the sessions of ``todo`` at once; ``during``: append each gateway's ruleset,
    taken while they run."""
    procs = []
    for c in todo:
        _, suffix, hosts, source, _ = PATHS[c.path]
        argv = ["ip", "netns", "exec", f"{lab.prefix}-{suffix}", sys.executable, "-c", SESSION, hosts[c.server],
                c.mode, source, str(timeout), FILE]
        procs.append((c, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    if during is not None:
        during.append({gw: lab.ruleset(gw) for gw in lab.gateways})
    results = []
    for c, p in procs:
        try:
            out, err = p.communicate(timeout=timeout * 3 + 10)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        results.append(Result(c, p.returncode, out, err))
    return results


def table(results: list[Result]) -> str:
    return "\n".join(f"  {r.cell.label:32} rc={r.rc} {r.outcome[:110]}" for r in results)


# ---- rulesets ---------------------------------------------------------------------------------
def blocks(ruleset: str) -> dict[str, list[str]]:
    """``nft list ruleset`` text -> {"table <family> <name>": its lines}."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in ruleset.splitlines():
        if line.startswith("table "):
            current = out.setdefault(line.rstrip(" {"), [])
        elif current is not None and line != "}":
            current.append(line)
    return out


def admin_tables(ruleset: str, loaded: str) -> dict[str, list[str]]:
    """The admin's tables in ``ruleset``: without ftpalg's table, and without the mangle
    chains (and the jump to them) that iptables-nft holds for ftpalg's queue rule; a mangle
    table that was not in ``loaded`` is iptables-nft's, made on demand for ftpalg."""
    had = blocks(loaded)
    out = {}
    for name, lines in blocks(ruleset).items():
        if name == "table inet ftpalg":
            continue
        if name in ("table ip mangle", "table ip6 mangle"):
            if name not in had:
                continue
            kept, skip = [], False
            for line in lines:
                if line.startswith("\tchain FTPALG-"):
                    skip = True
                elif line.startswith("\tchain "):
                    skip = False
                if not skip and "FTPALG-" not in line:
                    kept.append(line)
            lines = kept
        out[name] = lines
    return out


# ---- fixtures -----------------------------------------------------------------------------------
TIMINGS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module", params=firewalls.KINDS)
def firewall(request, lab):
    need(not firewalls.missing(request.param),
         f"{request.param}: {', '.join(firewalls.missing(request.param))} (./dev.sh setup installs it)")
    t0 = time.monotonic()
    with firewalls.swapped(lab, request.param) as sw:
        TIMINGS.setdefault(sw.kind, {}).update(sw.timings)
        yield sw
    TIMINGS[sw.kind]["kind total"] = time.monotonic() - t0
    print(f"\n{sw.kind}: " + ", ".join(f"{k} {v:.1f}s" for k, v in TIMINGS[sw.kind].items()))


@pytest.fixture(scope="module")
def algs(lab, firewall):
    """``ftpalg run`` (no options) in both gateways under ``firewall``; on exit, each
    gateway's ruleset must be exactly the firewall as loaded, the log free of tracebacks."""
    for gw in lab.gateways:
        assert lab.ruleset(gw) == firewall.loaded[gw]
    t0 = time.monotonic()
    procs = {lab.gw: lab.start_ftpalg(), lab.gw2: lab.start_ftpalg(gw=lab.gw2)}
    TIMINGS[firewall.kind]["ftpalg start"] = time.monotonic() - t0
    yield procs
    for gw, p in procs.items():
        assert lab.stop_ftpalg(p) == 0
        assert lab.ruleset(gw) == firewall.loaded[gw], f"{firewall.kind}: ruleset of {gw} changed by ftpalg"
        assert "Traceback" not in lab.ftpalg_log(gw)


def state_dump(lab: Lab, gw: str) -> str:
    """What to look at when a transfer fails: conntrack, expectations, ruleset, ftpalg's log."""
    parts = []
    for argv in (["conntrack", "-L"], ["conntrack", "-L", "-f", "ipv6"], ["conntrack", "-L", "expect"],
                 ["conntrack", "-L", "expect", "-f", "ipv6"], ["nft", "-s", "list", "ruleset"]):
        res = lab.ns(gw, argv, check=False)
        parts.append(f"--- {gw}: {' '.join(argv)}\n{res.stdout[-3000:]}")
    parts.append(f"--- {gw}: ftpalg log\n{lab.ftpalg_log(gw)[-3000:]}")
    return "\n".join(parts)


# ---- without ftpalg: the firewall drops what ftpalg must open ----------------------------------
IPTABLES = {"table ip filter", "table ip nat", "table ip6 filter"}
LOADED_TABLES = {  # (kind, gateway role): the tables a gateway holds, ftpalg not running
    ("iptables", "gw"): IPTABLES | {"table ip6 nat"}, ("iptables", "gw2"): IPTABLES,
    ("nftables", "gw"): {"table inet filter", "table inet nat"},
    ("nftables", "gw2"): {"table inet filter", "table ip nat"},
    ("firewalld", "gw"): {"table inet firewalld"}, ("firewalld", "gw2"): {"table inet firewalld"},
}


def test_without_ftpalg_active_and_ipv6_through_gw2_fail(lab, firewall):
    """Active mode through both gateways and EPRT/EPSV through gw2 (no NAT: only the firewall
    stands in the way) fail after a successful login; passive mode behind gw's NAT works, so
    the firewall passes control connections and outgoing data connections."""
    for gw in lab.gateways:
        tables = set(blocks(lab.ruleset(gw)))
        assert tables == set(blocks(firewall.loaded[gw])) == LOADED_TABLES[firewall.kind, firewall.role(gw)], tables
    fail = cells("client-nat", ("PORT", "EPRT")) + cells("server-dnat", ("PORT", "EPRT")) + cells("ipv6-no-nat")
    work = cells("client-nat", ("PASV", "EPSV"))
    t0 = time.monotonic()
    results = run_cells(lab, fail + work, timeout=4.0)
    TIMINGS[firewall.kind]["without ftpalg"] = time.monotonic() - t0
    print(f"\n{firewall.kind} without ftpalg:\n{table(results)}")
    bad = [r for r in results if not r.logged_in or r.ok(lab) != (r.cell in work)]
    assert not bad, f"{firewall.kind} without ftpalg:\n{table(bad)}\nall:\n{table(results)}"
    for gw in lab.gateways:
        assert lab.expectations(gw) == []


# ---- with ftpalg in both gateways ---------------------------------------------------------
def check_batch(lab: Lab, firewall: firewalls.Swapped, path: str) -> None:
    gw = lab.gw if PATHS[path][0] == "gw" else lab.gw2
    during: list[dict[str, str]] = []
    t0 = time.monotonic()
    results = run_cells(lab, cells(path), during=during)
    TIMINGS[firewall.kind][path] = time.monotonic() - t0
    failed = [r for r in results if not r.ok(lab)]
    assert not failed, (f"{firewall.kind} {path}: {len(failed)}/{len(results)} failed\n{table(failed)}\n"
                        + state_dump(lab, gw))
    for g in lab.gateways:  # the admin's tables, while ftpalg runs and sessions are open
        for snapshot in (during[0][g], lab.ruleset(g)):
            assert "table inet ftpalg" in snapshot
            assert admin_tables(snapshot, firewall.loaded[g]) == admin_tables(firewall.loaded[g], ""), \
                f"{firewall.kind}: admin's tables in {g} differ from those loaded:\n{snapshot}"
    assert no_pinholes_soon(lab, gw), lab.expectations(gw)  # nothing survives the sessions


def test_client_behind_nat(lab, firewall, algs):
    """10.0.0.2 behind gw (MASQUERADE) to 203.0.113.2-5: PORT, EPRT, PASV, EPSV."""
    check_batch(lab, firewall, "client-nat")


def test_servers_behind_dnat(lab, firewall, algs):
    """203.0.113.100 to 198.51.100.2-5 (only tcp/21 DNATed to 10.1.0.2-5): PORT, EPRT, PASV, EPSV."""
    check_batch(lab, firewall, "server-dnat")


def test_ipv6_nat66(lab, firewall, algs):
    """fd00:1::2 behind gw (NAT66) to 2001:db8:1::2-5: EPRT, EPSV."""
    check_batch(lab, firewall, "nat66")


def test_ipv6_without_nat(lab, firewall, algs):
    """2001:db8:1::100 to 2001:db8:3::2-5 behind gw2 (stateful, no NAT): EPRT, EPSV."""
    check_batch(lab, firewall, "ipv6-no-nat")


def test_pasv_pinhole_admits_only_the_announced_client(lab, firewall, algs):
    check_pasv_pinhole_admits_only_the_announced_client(lab, firewall.kind)


def test_ftpalg_adds_no_rule_to_the_admins_tables(lab, firewall, algs):
    """What ftpalg holds is its own table and its queue chain, nothing else; the pinholes of
    the sessions above were expectations, never rules."""
    for gw in lab.gateways:
        now = lab.ruleset(gw)
        assert admin_tables(now, firewall.loaded[gw]) == admin_tables(firewall.loaded[gw], "")
        extra = set(blocks(now)) - set(blocks(firewall.loaded[gw]))
        assert extra <= {"table inet ftpalg", "table ip mangle", "table ip6 mangle"}, extra
        log = lab.ftpalg_log(gw)
        assert "Traceback" not in log
