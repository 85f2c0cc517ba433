"""A failover lab: two gateways sharing virtual addresses, conntrackd between them, ftpalg on both::

  <p>-c    client        c0  10.0.0.2/24, default via 10.0.0.1 (virtual)
     |
  <p>-swi  inside LAN    bridge br0, ports c, gwa, gwb
     |                         |
  <p>-gwa  gateway A     gi  10.0.0.11       <p>-gwb  gateway B  gi  10.0.0.12
                         go  203.0.113.11                        go  203.0.113.12
                         gs  172.31.255.1 ---- sync link ------- gs  172.31.255.2
     |                         |
  <p>-swo  outside LAN   bridge br0, ports s, gwa, gwb
     |
  <p>-s    servers       s0  203.0.113.2 vsftpd, 203.0.113.3 pyftpdlib; default via 203.0.113.1 (virtual)

The virtual addresses ``10.0.0.1`` (inside) and ``203.0.113.1`` (outside, the public address)
live on the active gateway only. Both gateways forward with the same rules: FORWARD policy
DROP but ``ESTABLISHED,RELATED`` and inside -> outside, ``SNAT --to-source 203.0.113.1`` out
of the outside interface (the shared address, so both gateways translate identically), no FTP
helper; ``nf_conntrack_tcp_loose`` and ``nf_conntrack_tcp_be_liberal`` keep their defaults.

Both run ``ftpalg run`` and ``conntrackd`` in FTFW mode over UDP unicast on the sync link
(``conntrackd_conf``), with their config, lock, socket and log files in the lab's state
directory. conntrackd (1.4.7) replicates each TCP connection's tuple, state, status bits,
mark, timeout, master, NAT (IPv4 SNAT/DNAT address and port), helper name and sequence
adjustment (CTA_SEQ_ADJ_ORIG/REPLY) into the standby's external cache; it does not carry the
TCP window tracking (committed entries get conntrack's per-connection ``BE_LIBERAL`` flag,
``TCPWindowTracking Off``). Expectations are not synced by default. With ``ExpectationSync
On`` (``expectation_sync=True``) an expectation's tuple, mask, master and helper arrive but
not its NAT (saved address and port, ``nat-follow-master``): the data connection it admits on
the new gateway is not translated (measured: the new gateway's own stack answers the server's
SYN with RST, the server says 425). ftpalg does not depend on either: it closes a pinhole when
its transfer command gets its reply, so none is outstanding between transfers; a failover
between an announcement and its transfer command loses that one transfer, not the session.

``failover()`` moves the service to the other gateway the way keepalived with conntrackd's
``primary-backup.sh`` would: the old gateway fails (its LAN links go down, its virtual
addresses with them); the new one commits its external cache into the kernel (``-c``), flushes
both caches (``-f``), resynchronises its internal cache with the kernel (``-R``) and sends a
bulk update to the peer (``-B``); then it takes the virtual addresses and announces them with
gratuitous ARP. The commit comes before the addresses, so that no packet of a synced
connection reaches the new gateway before its conntrack entry does (keepalived runs the
script after moving the addresses: a window this lab closes).

Everything lives in namespaces named ``<prefix>-<suffix>`` (veths created inside them) and in
``STATE_ROOT/<prefix>``; ``down()`` removes all of it, processes included.

``python -m ftpalg.lab.failover_clients session HOST`` is the client side of ``FtpSession``: one
control connection kept open, driven by commands on stdin, one JSON answer per line.
``python -m ftpalg.lab.failover_clients load HOST SHA256`` is load to fail over under
(``FailoverLab.load``): clients looping whole sessions for a while, lost ones counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import servers
from .lab import (
    STATE_ROOT,
    LabError,
    add_namespaces,
    client_nat_firewall,
    ftpalg_argv,
    netns_list,
    popen_in,
    run,
    stop_processes,
    teardown,
)

CLIENT = "10.0.0.2"
INSIDE_VIP = "10.0.0.1"
PUBLIC_VIP = "203.0.113.1"
SERVERS = {"vsftpd": "203.0.113.2", "pyftpdlib": "203.0.113.3"}
GATEWAYS = ("gwa", "gwb")
OWN = {"gwa": {"gi": "10.0.0.11/24", "go": "203.0.113.11/24", "gs": "172.31.255.1/30"},
       "gwb": {"gi": "10.0.0.12/24", "go": "203.0.113.12/24", "gs": "172.31.255.2/30"}}
"""Each gateway's own addresses: inside, outside, sync link."""
VIPS = {"gi": f"{INSIDE_VIP}/24", "go": f"{PUBLIC_VIP}/24"}
SYNC_DEV = "gs"
SYNC_PORT = 3780
SUFFIXES = ("c", "s", "swi", "swo", *GATEWAYS)
FILE_SIZES = {"small.txt": 1000, "big.bin": 2 * 1024 * 1024}
CONNTRACKD = "/usr/sbin/conntrackd"
FLUSH_IGNORED = "ignoring flush command"
STALE = re.compile(r"^fo(\d+)-(?:c|s|swi|swo|gwa|gwb)$")

GW_FIREWALL = client_nat_firewall(f"SNAT --to-source {PUBLIC_VIP}")

CONNTRACKD_CONF = """# conntrackd for the failover lab, gateway {gw}
Sync {{
\tMode FTFW {{
\t\tDisableExternalCache Off
\t}}
\tUDP {{
\t\tIPv4_address {self_addr}
\t\tIPv4_Destination_Address {peer_addr}
\t\tPort {port}
\t\tInterface {dev}
\t\tChecksum on
\t}}
\tOptions {{
\t\tTCPWindowTracking Off{expectation_sync}
\t}}
}}
General {{
\tSystemd off
\t# more buckets than conntrackd's 8192 commit steps, else -f is ignored after -c (see _flush)
\tHashSize 32768
\tHashLimit 131072
\tLogFile {state}/conntrackd-{gw}.log
\tSyslog off
\tLockFile {state}/conntrackd-{gw}.lock
\tUNIX {{
\t\tPath {state}/conntrackd-{gw}.sock
\t}}
\tNetlinkBufferSize 2097152
\tNetlinkBufferSizeMaxGrowth 8388608
\tFilter From Userspace {{
\t\tProtocol Accept {{
\t\t\tTCP
\t\t}}
\t\tAddress Ignore {{
{ignore}
\t\t}}
\t}}
}}
"""

GARP = r"""
import socket, sys, time
dev, ip, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((dev, 0))
mac, a = s.getsockname()[4], socket.inet_aton(ip)
# ARP request, sender = target = the address: a gratuitous ARP (RFC 5227 announcement)
arp = bytes.fromhex("0001080006040001") + mac + a + bytes(6) + a
for i in range(count):
    s.send(b"\xff" * 6 + mac + b"\x08\x06" + arp)
    time.sleep(0.02)
"""

CT_GET = r"""
import json, socket, sys
from ftpalg.linux.ctnetlink import CtNetlink
src, sport, dst, dport = sys.argv[1:5]
e = CtNetlink().get((socket.inet_aton(src), int(sport), socket.inet_aton(dst), int(dport)))
print(json.dumps(None if e is None else {
    "reply": [socket.inet_ntoa(e.reply[0]), e.reply[1], socket.inet_ntoa(e.reply[2]), e.reply[3]],
    "helper": e.helper,
    "seqadj": None if e.seqadj is None else [[a.pos, a.before, a.after] for a in e.seqadj]}))
"""


def conntrackd_conf(gw: str, state: Path, expectation_sync: bool = False) -> str:
    """conntrackd.conf of gateway ``gw`` (``gwa``/``gwb``): FTFW over UDP unicast on the sync
    link to the peer, every file in ``state``; local traffic (loopback, the gateways' own and
    virtual addresses) is not replicated."""
    peer = GATEWAYS[1 - GATEWAYS.index(gw)]
    ignore = ["127.0.0.1", INSIDE_VIP, PUBLIC_VIP,
              *[a.split("/")[0] for g in GATEWAYS for a in OWN[g].values()]]
    return CONNTRACKD_CONF.format(gw=gw, self_addr=OWN[gw][SYNC_DEV].split("/")[0],
                                  peer_addr=OWN[peer][SYNC_DEV].split("/")[0], port=SYNC_PORT, dev=SYNC_DEV,
                                  state=state, expectation_sync="\n\t\tExpectationSync On" if expectation_sync else "",
                                  ignore="\n".join(f"\t\t\tIPv4_address {a}" for a in ignore))


def remove_stale() -> None:
    """Remove failover labs left by a killed run (their pid is gone)."""
    for pid in {m.group(1) for n in netns_list() if (m := STALE.match(n))}:
        if not os.path.exists(f"/proc/{pid}"):
            FailoverLab(f"fo{pid}").down()


@dataclass
class FailoverLab:
    prefix: str = field(default_factory=lambda: f"fo{os.getpid()}")
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    active: str = "gwa"
    ftpalg: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    timings: list[dict[str, float]] = field(default_factory=list)
    expectation_sync: bool = False

    def name(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    @property
    def namespaces(self) -> list[str]:
        return [self.name(s) for s in SUFFIXES]

    @property
    def standby(self) -> str:
        return GATEWAYS[1 - GATEWAYS.index(self.active)]

    @property
    def state(self) -> Path:
        return STATE_ROOT / self.prefix

    @property
    def files(self) -> Path:
        return self.state / "pub"

    def ns(self, suffix: str, argv: list[str], check: bool = True, timeout: float = 30,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.name(suffix), *argv], check=check, timeout=timeout, input=input)

    # ---- set-up and tear-down ---------------------------------------------------------------
    def up(self) -> None:
        self.down()
        self.active = GATEWAYS[0]
        try:
            self.state.mkdir(parents=True)
            self._files()
            self._topology()
            self._start_servers()
            for gw in GATEWAYS:
                self._start_conntrackd(gw)
            for gw in GATEWAYS:
                self.start_ftpalg(gw)
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        teardown(self.procs, self.namespaces, self.state)
        self.ftpalg.clear()
        with contextlib.suppress(OSError):
            STATE_ROOT.rmdir()

    def leftovers(self) -> list[str]:
        names = netns_list()
        return [n for n in self.namespaces if n in names]

    def _files(self) -> None:
        self.files.mkdir()
        self.files.chmod(0o755)
        for fname, size in FILE_SIZES.items():
            (self.files / fname).write_bytes(os.urandom(size))

    def _topology(self) -> None:
        n = self.name
        veths = [(n("c"), "c0", n("swi"), "c"), (n("s"), "s0", n("swo"), "s"),
                 *[(n(g), "gi", n("swi"), g) for g in GATEWAYS], *[(n(g), "go", n("swo"), g) for g in GATEWAYS],
                 (n("gwa"), SYNC_DEV, n("gwb"), SYNC_DEV)]
        addrs: dict[str, dict[str, list[str]]] = {
            n("c"): {"c0": [f"{CLIENT}/24"]},
            n("s"): {"s0": [f"{a}/24" for a in SERVERS.values()]},
            **{n(g): {d: [a] for d, a in OWN[g].items()} for g in GATEWAYS},
        }
        add_namespaces(self.namespaces, veths, addrs)
        for sw, ports in (("swi", ["c", *GATEWAYS]), ("swo", ["s", *GATEWAYS])):
            lines = ["link set lo up", "link add br0 type bridge stp_state 0",
                     *[f"link set {p} master br0" for p in ports], *[f"link set {p} up" for p in ports],
                     "link set br0 up"]
            run(["ip", "-n", n(sw), "-batch", "-"], input="".join(f"{line}\n" for line in lines))
        for suffix in SUFFIXES:
            self.ns(suffix, ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                             "net.ipv6.conf.default.disable_ipv6=1"])
        for g in GATEWAYS:
            # No FTP helper (gone from the kernel since 6.0, off by default before); loose
            # pick-up and strict windows stay as the kernel has them.
            self.ns(g, ["sh", "-c", "sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 "
                        "net.ipv4.conf.default.rp_filter=0; h=/proc/sys/net/netfilter/nf_conntrack_helper; "
                        "if [ -e $h ]; then echo 0 > $h; fi"])
            self.ns(g, ["iptables-restore"], input=GW_FIREWALL)
        run(["ip", "-n", n("c"), "route", "add", "default", "via", INSIDE_VIP])
        run(["ip", "-n", n("s"), "route", "add", "default", "via", PUBLIC_VIP])
        self._vips(self.active, add=True)

    def _vips(self, gw: str, add: bool) -> None:
        verb = "add" if add else "del"
        run(["ip", "-n", self.name(gw), "-batch", "-"], check=add,
            input="".join(f"addr {verb} {a} dev {d}\n" for d, a in VIPS.items()))

    def _start_servers(self) -> None:
        started = []
        for kind, addr in SERVERS.items():
            state = self.state / "servers" / f"{kind}-{addr}"
            argv = servers.server_command(kind, addr, self.files, state)
            p = popen_in(self.name("s"), argv, state / "server.out", stdin_log=True)
            self.procs.append(p)
            started.append((p, state / "server.out"))
        probe = "\n".join([
            "import socket, sys, time",
            "for a in sys.argv[1:]:",
            "    for i in range(200):",
            "        try:",
            "            socket.create_connection((a, 21), 0.5).close(); break",
            "        except OSError:",
            "            time.sleep(0.05)",
            "    else:",
            "        sys.exit(f'nothing listens on {a}:21')",
        ])
        res = self.ns("s", [sys.executable, "-c", probe, *SERVERS.values()], check=False)
        if res.returncode != 0:
            logs = [f"--- {log}:\n{log.read_text(errors='replace')[-2000:]}" for p, log in started]
            raise LabError("\n".join([res.stderr.strip(), *logs]))

    # ---- conntrackd -------------------------------------------------------------------------
    def conntrackd_conf_path(self, gw: str) -> Path:
        return self.state / f"conntrackd-{gw}.conf"

    def _start_conntrackd(self, gw: str, timeout: float = 10.0) -> None:
        conf = self.conntrackd_conf_path(gw)
        conf.write_text(conntrackd_conf(gw, self.state, self.expectation_sync))
        out = self.state / f"conntrackd-{gw}.out"
        p = popen_in(self.name(gw), [CONNTRACKD, "-C", str(conf)], out)
        self.procs.append(p)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p.poll() is not None:
                break
            if self.conntrackd(gw, "-s", check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise LabError(f"conntrackd did not start in {gw}:\n{out.read_text(errors='replace')}"
                       f"\n{self.conntrackd_log(gw)}")

    def conntrackd(self, gw: str, *opts: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``conntrackd -C <gw's config> OPTS`` in ``gw`` (a request to its daemon)."""
        return self.ns(gw, [CONNTRACKD, "-C", str(self.conntrackd_conf_path(gw)), *opts], check=check)

    def conntrackd_log(self, gw: str) -> str:
        path = self.state / f"conntrackd-{gw}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def external_cache(self, gw: str) -> list[str]:
        """What ``gw``'s conntrackd holds of its peer's connections (``conntrackd -e``)."""
        return [line for line in self.conntrackd(gw, "-e").stdout.splitlines() if "tcp" in line]

    # ---- ftpalg -----------------------------------------------------------------------------
    def ftpalg_log_path(self, gw: str) -> Path:
        return self.state / f"ftpalg-{gw}.log"

    def ftpalg_log(self, gw: str) -> str:
        path = self.ftpalg_log_path(gw)
        return path.read_text(errors="replace") if path.exists() else ""

    def ftpalg_counters(self, gw: str) -> dict[str, int]:
        """The counters of ``gw``'s running ftpalg (its status socket)."""
        code = "import json; from ftpalg.linux.status import fetch; print(json.dumps(fetch()['counters']))"
        counters: dict[str, int] = json.loads(self.ns(gw, [sys.executable, "-c", code]).stdout)
        return counters

    def start_ftpalg(self, gw: str, timeout: float = 15.0) -> subprocess.Popen[bytes]:
        log = self.ftpalg_log_path(gw)
        log.write_bytes(b"")
        p = popen_in(self.name(gw), [*ftpalg_argv(), "run", "--log-level", "info"], log)
        self.procs.append(p)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"bound to NFQUEUE" in log.read_bytes():
                self.ftpalg[gw] = p
                return p
            if p.poll() is not None:
                break
            time.sleep(0.05)
        raise LabError(f"ftpalg did not start in {gw}:\n{log.read_text(errors='replace')}")

    def stop_ftpalg(self, gw: str) -> int | None:
        p = self.ftpalg.pop(gw)
        stop_processes([p], timeout=10)
        self.procs.remove(p)
        return p.returncode

    # ---- failover ---------------------------------------------------------------------------
    def _links(self, gw: str, up: bool) -> None:
        state = "up" if up else "down"
        run(["ip", "-n", self.name(gw), "-batch", "-"], input=f"link set gi {state}\nlink set go {state}\n")

    def _flush(self, gw: str) -> None:
        """``conntrackd -f``, checked: conntrackd 1.4.7 ignores it (exit status 0, "ignoring
        flush command, commit still in progress" in its log) after any ``-c`` whose commit
        finished in one step, i.e. whenever HashSize <= its fixed 8192 commit steps: the
        commit's client descriptor is then never released. Hence HashSize 32768 here."""
        ignored = self.conntrackd_log(gw).count(FLUSH_IGNORED)
        self.conntrackd(gw, "-f")
        if self.conntrackd_log(gw).count(FLUSH_IGNORED) != ignored:
            raise LabError(f"conntrackd in {gw} ignored -f:\n{self.conntrackd_log(gw)[-2000:]}")

    def failover(self) -> dict[str, float]:
        """Move the service from the active gateway to the standby (see the module doc);
        return the seconds each step took."""
        old, new = self.active, self.standby
        t: dict[str, float] = {}
        t0 = time.monotonic()
        self._links(old, up=False)  # the old gateway fails: its links and addresses go
        self._vips(old, add=False)
        self._links(new, up=True)  # a gateway that failed before is back (no-op otherwise)
        t["old_down"] = time.monotonic() - t0
        for opt, what in (("-c", "commit"), ("-f", "flush"), ("-R", "resync"), ("-B", "bulk")):
            t1 = time.monotonic()
            if opt == "-f":
                self._flush(new)
            else:
                res = self.conntrackd(new, opt, check=False)
                if res.returncode != 0:
                    raise LabError(f"conntrackd {opt} in {new} failed: {res.stdout}{res.stderr}")
            t[what] = time.monotonic() - t1
        t1 = time.monotonic()
        self._vips(new, add=True)
        for dev, vip in VIPS.items():
            self.ns(new, [sys.executable, "-c", GARP, dev, vip.split("/")[0], "3"])
        t["vips_garp"] = time.monotonic() - t1
        t["total"] = time.monotonic() - t0
        self.active = new
        self.timings.append(t)
        return t

    # ---- inspection -------------------------------------------------------------------------
    def conntrack(self, gw: str, *args: str) -> list[str]:
        """``conntrack -L ARGS`` in ``gw``: the lines of entries."""
        res = self.ns(gw, ["conntrack", "-L", *args], check=False)
        return [line for line in res.stdout.splitlines() if line.startswith(("tcp", "udp", "icmp"))]

    def expectations(self, gw: str) -> list[str]:
        """``gw``'s conntrack expectations (ftpalg's open pinholes), as conntrack prints them."""
        res = self.ns(gw, ["conntrack", "-L", "expect"], check=False)
        return [line for line in res.stdout.splitlines() if "proto=" in line]

    def ct_entry(self, gw: str, src: str, sport: int, dst: str, dport: int) -> dict[str, Any] | None:
        """ftpalg's own reading of a conntrack entry in ``gw`` (ctnetlink): reply tuple, helper,
        sequence adjustment per direction as [pos, before, after] (None: not set)."""
        res = self.ns(gw, [sys.executable, "-c", CT_GET, src, str(sport), dst, str(dport)])
        value: dict[str, Any] | None = json.loads(res.stdout)
        return value

    def neighbour_mac(self, suffix: str, addr: str) -> str:
        """The link-layer address ``suffix``'s neighbour cache holds for ``addr`` ('' if none)."""
        words = self.ns(suffix, ["ip", "neigh", "show", addr]).stdout.split()
        return words[words.index("lladdr") + 1] if "lladdr" in words else ""

    def mac(self, gw: str, dev: str) -> str:
        return self.ns(gw, ["cat", f"/sys/class/net/{dev}/address"]).stdout.strip()

    def session(self, server: str, timeout: float = 10.0) -> FtpSession:
        s = FtpSession(self, SERVERS[server], timeout)
        self.procs.append(s.p)
        return s

    def load(self, server: str, seconds: float, modes: str, timeout: float = 5.0) -> subprocess.Popen[str]:
        """Clients looping whole sessions (login, RETR small.txt checked by SHA-256, QUIT) at
        ``server`` for ``seconds`` (``modes``: clients per mode, ``PORT*8,PASV*2``); its
        stdout, once it exits, is one JSON line: per mode, sessions, lost, first failures."""
        want = hashlib.sha256((self.files / "small.txt").read_bytes()).hexdigest()
        return subprocess.Popen(["ip", "netns", "exec", self.name("c"), sys.executable, "-m",
                                 "ftpalg.lab.failover_clients", "load", SERVERS[server], want,
                                 "--seconds", str(seconds), "--modes", modes, "--timeout", str(timeout)],
                                stdout=subprocess.PIPE, text=True)

    def close_session(self, s: FtpSession) -> None:
        s.close()
        if s.p in self.procs:
            self.procs.remove(s.p)


# ---- one control connection, driven from outside the client's namespace --------------------------
class FtpSession:
    """``python -m ftpalg.lab.failover_clients session HOST`` in the lab's client namespace: one
    control connection (ftplib, ``LabFTP``) that lives across failovers, driven by ``step``."""

    def __init__(self, lab: FailoverLab, host: str, timeout: float) -> None:
        self.timeout = timeout
        self.p = subprocess.Popen(["ip", "netns", "exec", lab.name("c"), sys.executable, "-m",
                                   "ftpalg.lab.failover_clients", "session", host, "--timeout", str(timeout)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True)
        self.hello = self._answer(timeout * 2)

    def _answer(self, timeout: float) -> dict[str, Any]:
        assert self.p.stdout is not None
        ready = select.select([self.p.stdout], [], [], timeout)[0]
        line = self.p.stdout.readline() if ready else b""
        if not line:
            return {"ok": False, "error": f"no answer within {timeout} s (exit {self.p.poll()})"}
        answer: dict[str, Any] = json.loads(line)
        return answer

    def step(self, command: str) -> dict[str, Any]:
        """Send one command (``get MODE NAME``, ``noop``, ``quit``); return its JSON answer."""
        assert self.p.stdin is not None
        self.p.stdin.write(command.encode() + b"\n")
        self.p.stdin.flush()
        return self._answer(self.timeout * 3)

    @property
    def local(self) -> tuple[str, int]:
        """The control connection's local address and port (its original tuple's source)."""
        addr, port = self.hello["local"]
        return str(addr), int(port)

    def close(self) -> str:
        if self.p.stdin is not None:
            with contextlib.suppress(OSError):
                self.p.stdin.close()
        try:
            self.p.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(5)
        return self.p.stderr.read().decode(errors="replace") if self.p.stderr else ""
