"""Other firewalls for the lab's gateways, equivalent to the lab's own iptables rules.

ftpalg's pinholes are conntrack expectations: the data connections they admit are RELATED,
and any firewall that accepts related traffic lets exactly those through, with no rule of
ftpalg's in it. ``swapped(lab, kind)`` replaces both gateways' firewalls with one of
``KINDS`` for the time of a ``with`` block and restores the lab's own afterwards:

* ``iptables``: the lab as it is (iptables-nft: FORWARD policy DROP, ESTABLISHED,RELATED
  accept; ``lab.GW1_FIREWALL`` etc.). Nothing is swapped.
* ``nftables``: a native nft ruleset of the same meaning in tables of its own
  (``nft_ruleset``): ``table inet filter`` with a DROP-policy forward chain and ``ct state
  established,related accept``, ``table inet nat`` (gw: masquerade, IPv4 and NAT66) or
  ``table ip nat`` (gw2: a DNAT map of tcp/21 and the SNAT of the both-NATs address).
* ``firewalld``: the real firewalld (Debian's package, nftables backend) running inside the
  gateway's namespace, configured by zone and policy files (``firewalld_files``) in a
  system-config directory of the lab's, on a private D-Bus system bus (a dbus-daemon of its
  own in the namespace, listening on a unix socket in the lab's state directory). gw: ``gi``
  in zone trusted, ``go`` in zone external with masquerade (IPv4, and IPv6 by a rich rule);
  gw2: ``go`` in zone public with rich-rule forward-ports of tcp/21 of each public address,
  ``gi`` in zone internal, a policy public -> internal that accepts new tcp/21 to the inside
  IPv6 network. firewalld's own table (``inet firewalld``) has the usual ``ct state
  established,related accept`` and ``ct status dnat accept`` in ``filter_FORWARD``, zone
  dispatch chains and a reject at the end. Not reproduced: gw2's forwarded port 2121 and
  the SNAT of 198.51.100.6 (firewalld has no SNAT to an address; ``ftpalg run`` without
  options watches port 21 only anyway).

Swapping empties the gateway's whole ruleset (``nft flush ruleset`` in that namespace only)
and its conntrack table; restoring stops firewalld, empties the ruleset again and reloads the
lab's iptables texts, then checks that ``nft -s list ruleset`` is what it was before the swap.
Nothing here touches the host's namespace (firewalld creates an empty ``/run/firewalld``,
removed again when this module created it). Not for production paths.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .lab import (
    BOTH_NAT_PUBLIC,
    GW1_FIREWALL,
    GW1_FIREWALL6,
    GW2_FIREWALL,
    GW2_FIREWALL6,
    GW2_INSIDE,
    INSIDE_NET6,
    INSIDE_SERVERS,
    PUBLIC_OF,
    Lab,
    LabError,
    stop_processes,
)

KINDS = ("iptables", "nftables", "firewalld")
ROLES = ("gw", "gw2")
"""gw: gateway 1 (clients behind MASQUERADE / NAT66); gw2: gateway 2 (servers behind DNAT)."""

FIREWALLD_TEMPDIR = Path("/run/firewalld")  # firewalld mkdir()s it at start
PROGRAMS = {"iptables": ("iptables-restore", "ip6tables-restore"), "nftables": ("nft",),
            "firewalld": ("nft", "firewalld", "firewall-cmd", "dbus-daemon")}


def missing(kind: str) -> list[str]:
    """The programs firewall ``kind`` needs that are not installed (``./dev.sh setup``
    installs them all)."""
    return [p for p in PROGRAMS[kind] if shutil.which(p) is None]


def _dnat4() -> list[tuple[str, str]]:
    """(public, inside) of each tcp/21 forward of gw2 (the forwarded port 2121 aside)."""
    pairs = [(pub, INSIDE_SERVERS[k]) for k, pub in PUBLIC_OF.items()]
    if "vsftpd" in INSIDE_SERVERS:
        pairs.append((BOTH_NAT_PUBLIC, INSIDE_SERVERS["vsftpd"]))
    return pairs


# ---- nftables -----------------------------------------------------------------------------------
def nft_ruleset(role: str) -> str:
    """A native nft ruleset for a gateway, meaning what the lab's iptables rules mean."""
    if role == "gw":
        return "\n".join([
            "table inet filter {",
            "\tchain forward {",
            "\t\ttype filter hook forward priority filter; policy drop;",
            "\t\tct state established,related accept",
            '\t\tiifname "gi" oifname "go" accept',
            "\t}",
            "}",
            "table inet nat {",
            "\tchain postrouting {",
            "\t\ttype nat hook postrouting priority srcnat; policy accept;",
            '\t\toifname "go" masquerade',
            "\t}",
            "}",
            "",
        ])
    if role == "gw2":
        dnat = ", ".join(f"{pub} . 21 : {priv} . 21" for pub, priv in _dnat4())
        return "\n".join([
            "table inet filter {",
            "\tchain forward {",
            "\t\ttype filter hook forward priority filter; policy drop;",
            "\t\tct state established,related accept",
            "\t\ticmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem } accept",
            '\t\tiifname "go" oifname "gi" tcp dport 21 ct status dnat accept',
            f'\t\tiifname "go" oifname "gi" ip6 daddr {INSIDE_NET6}:/64 tcp dport 21 ct state new accept',
            "\t}",
            "}",
            "table ip nat {",
            "\tchain prerouting {",
            "\t\ttype nat hook prerouting priority dstnat; policy accept;",
            f'\t\tiifname "go" dnat to ip daddr . tcp dport map {{ {dnat} }}',
            "\t}",
            "",
            "\tchain postrouting {",
            "\t\ttype nat hook postrouting priority srcnat; policy accept;",
            f'\t\toifname "gi" ct original ip daddr {BOTH_NAT_PUBLIC} snat to {GW2_INSIDE}',
            "\t}",
            "}",
            "",
        ])
    raise ValueError(role)


# ---- firewalld ----------------------------------------------------------------------------------
FIREWALLD_CONF = """\
# firewalld.conf of a lab gateway (the values are firewalld 1.3's defaults but the zone)
DefaultZone=drop
CleanupOnExit=yes
CleanupModulesOnExit=no
Lockdown=no
IPv6_rpfilter=yes
IndividualCalls=no
LogDenied=off
FirewallBackend=nftables
FlushAllOnReload=yes
RFC3964_IPv4=yes
"""


def _zone(short: str, body: list[str], target: str = "") -> str:
    attrs = f' target="{target}"' if target else ""
    return "\n".join(['<?xml version="1.0" encoding="utf-8"?>', f"<zone{attrs}>", f"  <short>{short}</short>",
                      *[f"  {line}" for line in body], "</zone>", ""])


def firewalld_files(role: str) -> dict[str, str]:
    """firewalld's system configuration for a gateway: relative path -> text. The ftp
    service is not used: it brings the kernel's ftp conntrack helper, which must stay off."""
    files = {"firewalld.conf": FIREWALLD_CONF}
    if role == "gw":
        files["zones/trusted.xml"] = _zone("Trusted", ['<interface name="gi"/>'], target="ACCEPT")
        files["zones/external.xml"] = _zone("External", [
            '<interface name="go"/>',
            "<masquerade/>",  # IPv4 only in firewalld 1.3; NAT66 by a rich rule:
            '<rule family="ipv6"><masquerade/></rule>',
        ])
    elif role == "gw2":
        forwards = [f'<rule family="ipv4"><destination address="{pub}"/>'
                    f'<forward-port port="21" protocol="tcp" to-port="21" to-addr="{priv}"/></rule>'
                    for pub, priv in _dnat4() if pub != BOTH_NAT_PUBLIC]
        files["zones/public.xml"] = _zone("Public", ['<interface name="go"/>', *forwards])
        files["zones/internal.xml"] = _zone("Internal", ['<interface name="gi"/>'])
        files["policies/ftp-control-in.xml"] = "\n".join([
            '<?xml version="1.0" encoding="utf-8"?>',
            '<policy target="CONTINUE">',
            "  <short>FTP control connections to the inside servers (IPv6, no NAT)</short>",
            '  <ingress-zone name="public"/>',
            '  <egress-zone name="internal"/>',
            f'  <rule family="ipv6"><destination address="{INSIDE_NET6}:/64"/>'
            '<port port="21" protocol="tcp"/><accept/></rule>',
            "</policy>",
            "",
        ])
    else:
        raise ValueError(role)
    return files


DBUS_CONF = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <!-- a private system bus for one firewalld in one lab namespace: root only, no activation -->
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="root"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""


# ---- swapping ---------------------------------------------------------------------------------
@dataclass
class Swapped:
    """The firewall a ``swapped`` block runs under."""

    lab: Lab
    kind: str
    loaded: dict[str, str] = field(default_factory=dict)
    """Gateway namespace -> ``nft -s list ruleset`` right after loading (the admin's tables)."""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def role(self, gw: str) -> str:
        return "gw" if gw == self.lab.gw else "gw2"


def lab_firewall(role: str) -> tuple[str, str]:
    """The lab's own iptables-restore and ip6tables-restore texts of a gateway."""
    return (GW1_FIREWALL, GW1_FIREWALL6) if role == "gw" else (GW2_FIREWALL, GW2_FIREWALL6)


def _flush(lab: Lab, gw: str) -> None:
    """Empty one gateway's ruleset and conntrack table (that namespace only)."""
    lab.ns(gw, ["nft", "flush", "ruleset"])
    lab.ns(gw, ["conntrack", "-F"], check=False)
    lab.ns(gw, ["conntrack", "-F", "expect"], check=False)


def _load_nft(lab: Lab, gw: str, text: str) -> None:
    res = subprocess.run(["ip", "netns", "exec", gw, "nft", "-f", "-"], input=text, capture_output=True, text=True,
                         timeout=30)
    if res.returncode != 0:
        raise LabError(f"nft -f in {gw}: {res.stderr.strip()}\n{text}")


def restore_lab_firewall(lab: Lab, gw: str) -> None:
    """Back to the lab's own iptables rules in one gateway, as ``Lab.up()`` loads them."""
    _flush(lab, gw)
    four, six = lab_firewall("gw" if gw == lab.gw else "gw2")
    for cmd, text in (("iptables-restore", four), ("ip6tables-restore", six)):
        res = subprocess.run(["ip", "netns", "exec", gw, cmd], input=text, capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise LabError(f"{cmd} in {gw}: {res.stderr.strip()}")


def _firewall_cmd(env: str, gw: str, *args: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", gw, "env", env, "firewall-cmd", *args], capture_output=True,
                          text=True, timeout=timeout)


def _start_firewalld(sw: Swapped, gw: str, timeout: float = 30.0) -> None:
    """A dbus-daemon and firewalld of their own in ``gw``; returns once firewalld runs with
    the zones of ``firewalld_files``."""
    lab, role = sw.lab, sw.role(gw)
    base = lab.state / f"firewalld-{role}"
    etc = base / "etc"
    for rel, text in firewalld_files(role).items():
        path = etc / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    sock = base / "bus"
    sock.unlink(missing_ok=True)
    (base / "dbus.conf").write_text(DBUS_CONF.replace("{socket}", str(sock)))
    bus = lab.popen(gw, ["dbus-daemon", f"--config-file={base / 'dbus.conf'}", "--nofork", "--nopidfile"],
                    base / "dbus.log")
    sw.procs.append(bus)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if bus.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"dbus-daemon did not start in {gw}: {(base / 'dbus.log').read_text()}")
        time.sleep(0.02)
    env = f"DBUS_SYSTEM_BUS_ADDRESS=unix:path={sock}"
    log = base / "firewalld.log"
    fwd = lab.popen(gw, ["env", env, "firewalld", "--nofork", "--nopid", "--system-config", str(etc),
                         "--log-target", "file", "--log-file", str(log)], base / "firewalld.out")
    sw.procs.append(fwd)
    deadline = time.monotonic() + timeout
    while True:
        state = _firewall_cmd(env, gw, "--state")
        if state.stdout.strip() == "running":
            break
        if fwd.poll() is not None or time.monotonic() > deadline:
            out = (base / "firewalld.out").read_text(errors="replace")
            text = log.read_text(errors="replace") if log.exists() else ""
            raise LabError(f"firewalld did not start in {gw} ({state.stdout.strip()} {state.stderr.strip()}):\n"
                           f"{out[-2000:]}\n{text[-2000:]}")
        time.sleep(0.1)
    text = log.read_text(errors="replace") if log.exists() else ""
    errors = [line for line in text.splitlines() if "ERROR" in line]
    if errors:
        raise LabError(f"firewalld in {gw}: " + "\n".join(errors))
    zones = _firewall_cmd(env, gw, "--get-active-zones").stdout.split()
    want = {"gw": ["trusted", "gi", "external", "go"], "gw2": ["public", "go", "internal", "gi"]}[role]
    if not all(w in zones for w in want):
        raise LabError(f"firewalld in {gw}: active zones {zones}, wanted {want}")


def install(sw: Swapped) -> None:
    """Load ``sw.kind`` into both gateways (replacing the lab's iptables rules)."""
    lab = sw.lab
    for gw in lab.gateways:
        t0 = time.monotonic()
        if sw.kind == "nftables":
            _flush(lab, gw)
            _load_nft(lab, gw, nft_ruleset(sw.role(gw)))
        elif sw.kind == "firewalld":
            _flush(lab, gw)
            _start_firewalld(sw, gw)
        elif sw.kind != "iptables":
            raise ValueError(sw.kind)
        sw.timings[f"load {sw.role(gw)}"] = time.monotonic() - t0
        sw.loaded[gw] = lab.ruleset(gw)


@contextlib.contextmanager
def swapped(lab: Lab, kind: str) -> Iterator[Swapped]:
    """Both gateways under firewall ``kind`` within the block; afterwards the lab's own
    firewall again, checked against the rulesets from before (LabError if different)."""
    before = {gw: lab.ruleset(gw) for gw in lab.gateways}
    made_tempdir = not FIREWALLD_TEMPDIR.exists()
    sw = Swapped(lab, kind)
    try:
        install(sw)
        yield sw
    finally:
        for p in reversed(sw.procs):  # firewalld (removes its table: CleanupOnExit), then its bus
            stop_processes([p], timeout=10)
        for p in sw.procs:
            if p in lab.procs:
                lab.procs.remove(p)
        if kind != "iptables":
            for gw in lab.gateways:
                restore_lab_firewall(lab, gw)
        if made_tempdir:
            with contextlib.suppress(OSError):
                FIREWALLD_TEMPDIR.rmdir()
    after = {gw: lab.ruleset(gw) for gw in lab.gateways}
    changed = [gw for gw in lab.gateways if after[gw] != before[gw]]
    if changed:
        raise LabError(f"the lab's firewall was not restored in {changed}")
