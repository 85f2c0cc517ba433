"""A network-namespace lab holding every topology the ALG must handle, built once::

  <p>-c    inside clients   c0  10.0.0.2  10.0.0.3  fd00:1::2  fd00:1::3
                                default via 10.0.0.1, fd00:1::1
    │ c0 ── gi
  <p>-gw   gateway 1        gi  10.0.0.1  fd00:1::1
           (client NAT)     go  203.0.113.1  2001:db8:1::1; default via 203.0.113.254, 2001:db8:1::fe
                            MASQUERADE and NAT66 MASQUERADE out of go;
                            FORWARD DROP but ESTABLISHED,RELATED and gi -> go (IPv4 and IPv6)
    │ go ── s0
  <p>-s    "the internet"   s0  203.0.113.254  2001:db8:1::fe (router)
           ip_forward,          servers   203.0.113.2 vsftpd, .3 pyftpdlib, .4 proftpd, .5 pure-ftpd
           no firewall,                   2001:db8:1::2 .. ::5 (same order)
           no route to          clients   203.0.113.100, .101 (unrelated)   2001:db8:1::100, ::101
           10/8 or fd00::/8 s1  198.51.100.254  2001:db8:2::fe; 2001:db8:3::/64 via 2001:db8:2::1
    │ s1 ── go
  <p>-gw2  gateway 2        go  198.51.100.1 (own), .2 .3 .4 .5 .6 (public)  2001:db8:2::1
           (server DNAT)        default via 198.51.100.254, 2001:db8:2::fe
                            gi  10.1.0.1  2001:db8:3::1
                            DNAT 198.51.100.2..5 tcp/21 -> 10.1.0.2..5:21 (port 21 only, no SNAT),
                                 198.51.100.3:2121 -> 10.1.0.3:21 (a different public control port),
                                 198.51.100.6:21 -> 10.1.0.2:21 and SNAT to 10.1.0.1 (both NATs);
                            FORWARD DROP but ESTABLISHED,RELATED and NEW DNATed tcp/21;
                            IPv6 without NAT: FORWARD DROP but ESTABLISHED,RELATED, ICMPv6 errors
                            and NEW tcp/21 to 2001:db8:3::/64
    │ gi ── i0
  <p>-i    inside servers   i0  10.1.0.2 vsftpd, .3 pyftpdlib, .4 proftpd, .5 pure-ftpd
                                2001:db8:3::2 .. ::5 (same order); default via 10.1.0.1, 2001:db8:3::1

Paths: inside client -> gw1 -> outside server (client NAT); outside client -> gw2 -> inside
server (server DNAT); inside client -> gw1 -> 198.51.100.x -> gw2 -> inside server (double
NAT); IPv6 through NAT66 at gw1 and through a stateful gateway without NAT at gw2. Only
control connections are let through: without an ALG, active mode fails at gw1 and passive
mode at gw2, and inside servers cannot open any connection of their own. No FTP conntrack
helper anywhere. A server runs on every address above for each kind in
``servers.SERVER_KINDS`` (the others' addresses stay unused).

This module holds the addresses, the gateways' firewalls and ``build()``, which creates the
namespaces (the veths inside them: nothing is added to the host's own namespace) and gives
each its addresses, routes and rules. ``lab.Lab`` builds the lab with it and runs what is in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import servers
from .netns import add_namespaces, link_batch, run_all

# ---- addresses --------------------------------------------------------------------------------
_HOST = {"vsftpd": 2, "pyftpdlib": 3, "proftpd": 4, "pure-ftpd": 5}
"""Host part of each server kind's addresses, in every network that holds servers."""
_KINDS = [k for k in servers.SERVER_KINDS if k in _HOST]  # kinds the lab has addresses for

# gw1's inside: clients behind MASQUERADE / NAT66.
CLIENT_NET = "10.0.0"
CLIENT_NET6 = "fd00:1:"
GW_INSIDE = f"{CLIENT_NET}.1"
GW_INSIDE6 = f"{CLIENT_NET6}:1"
CLIENTS = (f"{CLIENT_NET}.2", f"{CLIENT_NET}.3")
CLIENTS6 = (f"{CLIENT_NET6}:2", f"{CLIENT_NET6}:3")

# The link between gw1 and "the internet": outside servers and outside clients.
PUBLIC_NET = "203.0.113"
PUBLIC_NET6 = "2001:db8:1:"
GW_PUBLIC = f"{PUBLIC_NET}.1"
GW_PUBLIC6 = f"{PUBLIC_NET6}:1"
ROUTER = f"{PUBLIC_NET}.254"
# Ports that tests and examples bind on purpose (active-mode data ports, listeners): below the
# ephemeral range of every lab namespace, so no earlier connection holds them. (Reserving them
# inside the range instead made bind(0) land on the first free port after the reserved block
# about a fifth of the time: 43001 again and again, then "425 Cannot assign requested address"
# from servers connecting from port 20 to a port still in TIME_WAIT.)
FIXED_PORTS = (40000, 42999)
EPHEMERAL_PORTS = (43000, 60999)
ROUTER6 = f"{PUBLIC_NET6}:fe"
SERVERS = {k: f"{PUBLIC_NET}.{_HOST[k]}" for k in _KINDS}
"""Outside servers (kind -> IPv4 address) in <p>-s."""
SERVERS6 = {k: f"{PUBLIC_NET6}:{_HOST[k]:x}" for k in _KINDS}
OUTSIDE_CLIENTS = (f"{PUBLIC_NET}.100", f"{PUBLIC_NET}.101")
"""Clients on the internet, in <p>-s; the second one is unrelated to any session of the first."""
OUTSIDE_CLIENTS6 = (f"{PUBLIC_NET6}:100", f"{PUBLIC_NET6}:101")

# The link between "the internet" and gw2.
GW2_NET = "198.51.100"
GW2_NET6 = "2001:db8:2:"
GW2_PUBLIC = f"{GW2_NET}.1"
GW2_PUBLIC6 = f"{GW2_NET6}:1"
ROUTER2 = f"{GW2_NET}.254"
ROUTER2_6 = f"{GW2_NET6}:fe"
PUBLIC_OF = {k: f"{GW2_NET}.{_HOST[k]}" for k in _KINDS}
"""Public address at gw2 of each inside server (kind -> IPv4); only its port 21 is forwarded."""
FORWARDED_PORT = (f"{GW2_NET}.3", 2121)
"""A public control port that differs from the server's: -> pyftpdlib 10.1.0.3:21."""
BOTH_NAT_PUBLIC = f"{GW2_NET}.6"
"""Port 21 here -> vsftpd 10.1.0.2:21 with the client SNATed to GW2_INSIDE (both NATs at gw2)."""

# gw2's inside: servers behind DNAT (IPv4), globally addressed behind a stateful gateway (IPv6).
INSIDE_NET = "10.1.0"
INSIDE_NET6 = "2001:db8:3:"
GW2_INSIDE = f"{INSIDE_NET}.1"
GW2_INSIDE6 = f"{INSIDE_NET6}:1"
INSIDE_SERVERS = {k: f"{INSIDE_NET}.{_HOST[k]}" for k in _KINDS}
INSIDE_SERVERS6 = {k: f"{INSIDE_NET6}:{_HOST[k]:x}" for k in _KINDS}

SUFFIXES = ("c", "gw", "s", "gw2", "i")
"""Namespace names are <prefix>-<suffix>."""

# ---- firewalls ---------------------------------------------------------------------------------
# Each gateway has an inside interface "gi" and an outside interface "go".
def client_nat_firewall(source_nat: str) -> str:
    """iptables-restore text of a gateway with clients inside: FORWARD DROP but for what the
    inside starts and what belongs to it, and ``source_nat`` (a target) on the way out."""
    return f"""*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -i gi -o go -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -o go -j {source_nat}
COMMIT
"""


GW1_FIREWALL = client_nat_firewall("MASQUERADE")
FIREWALL = GW1_FIREWALL  # the name of earlier versions
GW1_FIREWALL6 = GW1_FIREWALL  # the same rules with NAT66


def _gw2_firewall() -> str:
    dnat = [(pub, 21, INSIDE_SERVERS[k]) for k, pub in PUBLIC_OF.items()]
    if "pyftpdlib" in INSIDE_SERVERS:
        dnat.append((*FORWARDED_PORT, INSIDE_SERVERS["pyftpdlib"]))
    if "vsftpd" in INSIDE_SERVERS:
        dnat.append((BOTH_NAT_PUBLIC, 21, INSIDE_SERVERS["vsftpd"]))
    lines = [
        "*filter", ":INPUT ACCEPT [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
        "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A FORWARD -i go -o gi -p tcp -m tcp --dport 21 -m conntrack --ctstate DNAT -j ACCEPT",
        "COMMIT",
        "*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        *[f"-A PREROUTING -d {pub}/32 -i go -p tcp -m tcp --dport {port} -j DNAT --to-destination {priv}:21"
          for pub, port, priv in dnat],
        f"-A POSTROUTING -o gi -m conntrack --ctorigdst {BOTH_NAT_PUBLIC}/32 -j SNAT --to-source {GW2_INSIDE}",
        "COMMIT", "",
    ]
    return "\n".join(lines)


GW2_FIREWALL = _gw2_firewall()
GW2_FIREWALL6 = "\n".join([
    "*filter", ":INPUT ACCEPT [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
    "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
    # ICMPv6 errors (RFC 4890); neighbour discovery is link-local: INPUT/OUTPUT accept it.
    *[f"-A FORWARD -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j ACCEPT" for t in (1, 2, 3, 4)],
    f"-A FORWARD -d {INSIDE_NET6}:/64 -i go -o gi -p tcp -m tcp --dport 21 -m conntrack --ctstate NEW -j ACCEPT",
    "COMMIT", "",
])

# ---- namespaces ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    """What one namespace is given: addresses per device, routes, whether it forwards, rules."""

    suffix: str
    addrs: dict[str, list[str]]
    routes: list[str] = field(default_factory=list)
    router: bool = False
    rules4: str = ""
    rules6: str = ""


def _nodes() -> list[Node]:
    s0 = ([f"{a}/24" for a in SERVERS.values()] + [f"{a}/24" for a in OUTSIDE_CLIENTS] + [f"{ROUTER}/24"]
          + [f"{a}/64" for a in SERVERS6.values()] + [f"{a}/64" for a in OUTSIDE_CLIENTS6] + [f"{ROUTER6}/64"])
    return [
        Node("c", {"c0": [f"{a}/24" for a in CLIENTS] + [f"{a}/64" for a in CLIENTS6]},
              [f"default via {GW_INSIDE}", f"::/0 via {GW_INSIDE6}"]),
        Node("gw", {"gi": [f"{GW_INSIDE}/24", f"{GW_INSIDE6}/64"], "go": [f"{GW_PUBLIC}/24", f"{GW_PUBLIC6}/64"]},
              [f"default via {ROUTER}", f"::/0 via {ROUTER6}"], True, GW1_FIREWALL, GW1_FIREWALL6),
        Node("s", {"s0": s0, "s1": [f"{ROUTER2}/24", f"{ROUTER2_6}/64"]},
              [f"{INSIDE_NET6}:/64 via {GW2_PUBLIC6}"], True),
        Node("gw2", {"go": [f"{GW2_PUBLIC}/24", *[f"{a}/32" for a in PUBLIC_OF.values()], f"{BOTH_NAT_PUBLIC}/32",
                             f"{GW2_PUBLIC6}/64"],
                      "gi": [f"{GW2_INSIDE}/24", f"{GW2_INSIDE6}/64"]},
              [f"default via {ROUTER2}", f"::/0 via {ROUTER2_6}"], True, GW2_FIREWALL, GW2_FIREWALL6),
        Node("i", {"i0": [f"{a}/24" for a in INSIDE_SERVERS.values()] + [f"{a}/64" for a in INSIDE_SERVERS6.values()]},
              [f"default via {GW2_INSIDE}", f"::/0 via {GW2_INSIDE6}"]),
    ]


LINKS = (("c", "c0", "gw", "gi"), ("gw", "go", "s", "s0"), ("s", "s1", "gw2", "go"), ("gw2", "gi", "i", "i0"))
"""veth pairs: (namespace suffix, device, peer's namespace suffix, peer device)."""


def build(prefix: str, scripts: Path, nodes: list[Node] | None = None,
          links: tuple[tuple[str, str, str, str], ...] = LINKS) -> None:
    """Create the namespaces ``<prefix>-<suffix>`` with their links, addresses, routes and
    firewalls. Each namespace is set up by shell scripts kept in ``scripts`` for inspection.
    ``nodes`` and ``links``: another topology's (``nat64``), this module's by default."""
    nodes = _nodes() if nodes is None else nodes
    add_namespaces([f"{prefix}-{n.suffix}" for n in nodes],
                   [(f"{prefix}-{a}", d, f"{prefix}-{b}", pd) for a, d, b, pd in links])
    scripts.mkdir(parents=True, exist_ok=True)
    # Links are up everywhere before any route is added or any server binds.
    first, second = [], []
    for node in nodes:
        devs = list(node.addrs)
        keys = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                *[f"net.ipv6.conf.{d}.{k}" for d in devs
                  for k in ("accept_dad=0", "disable_ipv6=0", "accept_ra=0")],
                *[f"net.ipv4.conf.{d}.rp_filter=0" for d in devs],
                # Fixed data ports of tests and examples: never an ephemeral port left in
                # TIME_WAIT by an earlier connection (bind would fail with EADDRINUSE).
                "net.ipv4.ip_local_port_range='{} {}'".format(*EPHEMERAL_PORTS),
                # Servers that connect from port 20 (pure-ftpd, vsftpd) meet a client data port
                # they used within the last minute now and then: without reusing the TIME_WAIT
                # entry, connect fails ("425 ... Cannot assign requested address").
                "net.ipv4.tcp_tw_reuse=1"]
        if node.router:
            keys += ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]
        script = ["set -e", f"sysctl -qw {' '.join(keys)}",
                  # No FTP helper: gone from the kernel since 6.0, off by default before.
                  "h=/proc/sys/net/netfilter/nf_conntrack_helper; if [ -e $h ]; then echo 0 > $h; fi",
                  "ip -batch - <<'EOF'", *link_batch(node.addrs), "EOF"]
        first.append(_script(prefix, scripts, node.suffix, "links", script))
        script = ["set -e", "ip -batch - <<'EOF'", *[f"route add {r}" for r in node.routes], "EOF"]
        if node.rules4:
            script += ["iptables-restore <<'EOF'", node.rules4.rstrip("\n"), "EOF"]
        if node.rules6:
            script += ["ip6tables-restore <<'EOF'", node.rules6.rstrip("\n"), "EOF"]
        second.append(_script(prefix, scripts, node.suffix, "routes", script))
    run_all(first)
    run_all(second)


def _script(prefix: str, scripts: Path, suffix: str, step: str, lines: list[str]) -> tuple[list[str], None]:
    """A shell script run in a namespace, kept in ``scripts`` for inspection."""
    path = scripts / f"{suffix}-{step}.sh"
    path.write_text("\n".join(lines) + "\n")
    return ["ip", "netns", "exec", f"{prefix}-{suffix}", "sh", str(path)], None
