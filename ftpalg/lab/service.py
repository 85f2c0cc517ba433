"""A load-balanced FTP service in the shape of a Kubernetes cluster running kube-proxy in
iptables mode: three replicas of one FTP server on two nodes, behind the rules kube-proxy
writes, an outside client and a client pod. ``ServiceLab`` builds it in network namespaces
named ``<prefix>-<suffix>``::

  <p>-c     outside client,  lan (a bridge: the LAN's switch, no netfilter on its frames; ports
            the LAN's router       n0, n1): 192.168.49.100/24 (the client), 192.168.49.1/24 (the
            and switch             router: forwards; 192.0.2.0/24 via 192.168.49.2; the service
                                   network 10.96.0.0/12 answered locally, so that a port no
                                   Service publishes is refused at once; no route to the pods)
    │ n0 ── eth0                                   │ n1 ── eth0
  <p>-node  node A           eth0  192.168.49.2/24,       <p>-node2  node B   eth0  192.168.49.3/24
            (the clients           192.0.2.10/32 and                 cni0  10.244.1.1/24
            come in here)          192.0.2.11/32 (the                10.244.0.0/24 via
                                   load-balancer IPs, held           192.168.49.2
                                   here as kube-vip holds them)
                             cni0  10.244.0.1/24 (a bridge, the pods' veths in it, as the bridge
                                   CNI plugin makes it); 10.244.1.0/24 via 192.168.49.3
                                   (flannel's host-gw backend)
    both: default via 192.168.49.1, ip_forward, route_localnet, the same kube-proxy ruleset
    (``kube_proxy_rules``): nat PREROUTING/OUTPUT -> KUBE-SERVICES -> KUBE-EXT-*
    (KUBE-MARK-MASQ) -> KUBE-SVC-* (-m statistic --mode random --probability 1/3, 1/2) ->
    KUBE-SEP-* (DNAT to the pod); POSTROUTING -> KUBE-POSTROUTING (MASQUERADE --random-fully
    of packets marked 0x4000); NodePorts in KUBE-NODEPORTS; filter FORWARD policy DROP but
    KUBE-FORWARD (marked packets, RELATED,ESTABLISHED); flannel's FLANNEL-FWD (from or to a
    pod) and FLANNEL-POSTRTG (the pods' own traffic out of the pod network masqueraded)
    │ veth0, veth1, vethc ── eth0                  │ veth2 ── eth0
  <p>-p0, <p>-p1  replicas 0, 1  10.244.0.2, .3    <p>-p2  replica 2  10.244.1.2
  <p>-cp          client pod     10.244.0.10       (default via its node's cni0 address)
                             every replica runs two vsftpd:
                             :21   default configuration (what ftpalg needs: nothing published
                                   but the control port, no address configured)
                             :2121 configured as FTP images tell Kubernetes users: passive ports
                                   30000-30009 (pasv_min_port/pasv_max_port), 227 announcing the
                                   service's load-balancer IP (pasv_address)
                             and serves ``FILE`` with contents of its own and says which
                             replica it is in its banner ("220 replica N of 3")

Services (``SERVICES``; chain names hashed as kube-proxy hashes them, ``port_proto_hash``):

* ``ftp/ftp`` (type LoadBalancer): ClusterIP 10.96.0.21, load-balancer IP 192.0.2.10; port
  ``control`` 21 -> 21, NodePort 30021. Only the control port is published.
* ``ftp/ftp-classic`` (type LoadBalancer, no NodePorts): ClusterIP 10.96.0.22, load-balancer
  IP 192.0.2.11; port ``control`` 21 -> 2121 and ``pasv-30000`` .. ``pasv-30009`` -> the same
  port: the passive range published, each port a service of its own to kube-proxy, balanced
  on its own.
* ``default/kubernetes`` (ClusterIP 10.96.0.1:443 -> 192.168.49.2:6443), as every cluster has.

The clients reach the services at ``ENTRIES``, all through node A: the outside client each
load-balancer IP on port 21 and ``ftp/ftp``'s NodePort on node A's address, which kube-proxy
masquerades (externalTrafficPolicy Cluster, the default: replicas 0 and 1 see the client as
10.244.0.1, replica 2 as 192.168.49.2); the client pod ``ftp/ftp``'s ClusterIP, not
masqueraded. No FTP conntrack helper anywhere; bridge-nf-call-iptables is on in the nodes (a
new namespace's default here), as Kubernetes requires. The nodes and the router send ICMP
errors without a rate limit (``icmp_ratelimit`` 0). Not for production paths.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import servers
from .lab import EPHEMERAL_PORTS, Lab
from .netns import add_namespaces, link_batch, run_all

NODE_NET = "192.168.49"
NODES = (f"{NODE_NET}.2", f"{NODE_NET}.3")
"""The nodes' addresses: node A (the one the clients reach, holding the load-balancer IPs, the
client pod and replicas 0 and 1) and node B (replica 2)."""
NODE_IP = NODES[0]
CLIENT = f"{NODE_NET}.100"
ROUTER = f"{NODE_NET}.1"
LB_NET = "192.0.2"
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/12"
POD_NETS = ("10.244.0", "10.244.1")  # each node's /24 of CLUSTER_CIDR, its cni0 at .1
REPLICAS = 3
POD_NODE = (0, 0, 1)  # the node of each replica
PODS = ("10.244.0.2", "10.244.0.3", "10.244.1.2")
CLIENT_POD = "10.244.0.10"  # on node A
CLASSIC_PORT = 2121  # the pods' second vsftpd, configured for a published passive range
PASSIVE_RANGE = (30000, 30009)
FILE = "replica.bin"
FILE_SIZE = 256 * 1024
MASQ_MARK = 0x4000


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    target: int
    node_port: int | None = None


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    cluster_ip: str
    ports: tuple[ServicePort, ...]
    lb_ip: str | None = None
    endpoints: tuple[str, ...] = PODS

    def port_name(self, p: ServicePort) -> str:
        """kube-proxy's ServicePortName string: ``namespace/name:port``."""
        return f"{self.namespace}/{self.name}:{p.name}"


SERVICES = (
    Service("default", "kubernetes", "10.96.0.1", (ServicePort("https", 443, 6443),), endpoints=(NODE_IP,)),
    Service("ftp", "ftp", "10.96.0.21", (ServicePort("control", 21, 21, 30021),), f"{LB_NET}.10"),
    Service("ftp", "ftp-classic", "10.96.0.22",
            (ServicePort("control", 21, CLASSIC_PORT),
             *[ServicePort(f"pasv-{p}", p, p) for p in range(PASSIVE_RANGE[0], PASSIVE_RANGE[1] + 1)]),
            f"{LB_NET}.11"),
)
LB_FTP = f"{LB_NET}.10"
LB_CLASSIC = f"{LB_NET}.11"
NODE_PORT = 30021
ENTRIES = {
    "lb": ("c", LB_FTP, 21),  # ftp/ftp: only the control port published
    "lb-classic": ("c", LB_CLASSIC, 21),  # ftp/ftp-classic: the passive range published too
    "nodeport": ("c", NODE_IP, NODE_PORT),  # ftp/ftp's NodePort
    "clusterip": ("cp", "10.96.0.21", 21),  # ftp/ftp's ClusterIP, from a client pod
}
"""Who connects where: name -> (the client's namespace suffix, address, port)."""
CONTROL_PORTS = (21, CLASSIC_PORT, NODE_PORT)
"""What ``ftpalg run`` is given (``--control-port``) on every node: each port a control
connection is opened to as a node sees it before its DNAT. The services' port 21 and the
NodePort where the clients come in; on the node of a replica reached from another node, the
port the other node DNATed to (the target port: 2121 of ``ftp/ftp-classic``)."""
FTPALG_ARGS = tuple(a for port in CONTROL_PORTS for a in ("--control-port", str(port)))


# ---- kube-proxy's ruleset -----------------------------------------------------------------------
def port_proto_hash(service_port_name: str, protocol: str = "tcp") -> str:
    """kube-proxy's chain-name hash (pkg/proxy/iptables/proxier.go ``portProtoHash``): the first
    16 characters of base32(sha256(name + protocol))."""
    return base64.b32encode(hashlib.sha256((service_port_name + protocol).encode()).digest()).decode()[:16]


def _probability(remaining: int) -> str:
    """kube-proxy's ``--probability`` of the first of ``remaining`` endpoints."""
    return f"{1.0 / remaining:0.10f}"


def _service_rules(svc: Service) -> tuple[list[str], list[str]]:
    """(chains, rules) of one service in the nat table, in kube-proxy's form."""
    chains: list[str] = []
    rules: list[str] = []
    for p in svc.ports:
        spn = svc.port_name(p)
        h = port_proto_hash(spn)
        svc_chain, ext_chain = f"KUBE-SVC-{h}", f"KUBE-EXT-{h}"
        chains.append(svc_chain)
        rules.append(f'-A KUBE-SERVICES -d {svc.cluster_ip}/32 -p tcp -m comment --comment "{spn} cluster IP" '
                     f"-m tcp --dport {p.port} -j {svc_chain}")
        external = svc.lb_ip is not None or p.node_port is not None
        if external:
            chains.append(ext_chain)
            if svc.lb_ip is not None:
                rules.append(f'-A KUBE-SERVICES -d {svc.lb_ip}/32 -p tcp -m comment --comment "{spn} loadbalancer IP" '
                             f"-m tcp --dport {p.port} -j {ext_chain}")
            if p.node_port is not None:
                rules.append(f'-A KUBE-NODEPORTS -p tcp -m comment --comment "{spn}" -m tcp --dport {p.node_port} '
                             f"-j {ext_chain}")
            rules.append(f'-A {ext_chain} -m comment --comment "masquerade traffic for {spn} external destinations" '
                         "-j KUBE-MARK-MASQ")
            rules.append(f"-A {ext_chain} -j {svc_chain}")
        rules.append(f'-A {svc_chain} ! -s {CLUSTER_CIDR} -d {svc.cluster_ip}/32 -p tcp -m comment --comment '
                     f'"{spn} cluster IP" -m tcp --dport {p.port} -j KUBE-MARK-MASQ')
        n = len(svc.endpoints)
        for i, ep in enumerate(svc.endpoints):
            endpoint = f"{ep}:{p.target}"
            sep = "KUBE-SEP-" + port_proto_hash(spn, "tcp" + endpoint)
            chains.append(sep)
            pick = f" -m statistic --mode random --probability {_probability(n - i)}" if i < n - 1 else ""
            rules.append(f'-A {svc_chain} -m comment --comment "{spn} -> {endpoint}"{pick} -j {sep}')
            rules.append(f'-A {sep} -s {ep}/32 -m comment --comment "{spn}" -j KUBE-MARK-MASQ')
            rules.append(f'-A {sep} -p tcp -m comment --comment "{spn}" -m tcp -j DNAT --to-destination {endpoint}')
    return chains, rules


def flannel_masq(node: int) -> list[tuple[str, str]]:
    """flannel's FLANNEL-POSTRTG on node ``node``: (match, target); pods' own traffic leaving
    the cluster network is masqueraded."""
    subnet = f"{POD_NETS[node]}.0/24"
    return [(f"-m mark --mark {MASQ_MARK:#x}/{MASQ_MARK:#x}", "RETURN"),
            (f"-s {subnet} -d {CLUSTER_CIDR}", "RETURN"),
            (f"-s {CLUSTER_CIDR} -d {subnet}", "RETURN"),
            (f"! -s {CLUSTER_CIDR} -d {subnet}", "RETURN"),
            (f"-s {CLUSTER_CIDR} ! -d 224.0.0.0/4", "MASQUERADE --random-fully"),
            (f"! -s {CLUSTER_CIDR} -d {CLUSTER_CIDR}", "MASQUERADE --random-fully")]


def kube_proxy_rules(services: Iterable[Service] = SERVICES, node: int = 0) -> str:
    """iptables-restore text of the node: kube-proxy's (and kubelet's) tables in iptables mode,
    as its recent releases write them (chain names, comments, the masquerade mark and its
    clearing, ``--random-fully``), and the CNI's: flannel's FLANNEL-FWD (accept what comes
    from or goes to a pod) and FLANNEL-POSTRTG of node ``node``; the filter FORWARD policy
    DROP (as a node with Docker has it). kube-proxy's part is the same on every node."""
    chains: list[str] = []
    rules: list[str] = []
    for svc in services:
        c, r = _service_rules(svc)
        chains += c
        rules += r
    rules.append('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last '
                 'rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')
    mark = f"{MASQ_MARK:#x}"
    return "\n".join([
        "*mangle",
        ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        ":KUBE-IPTABLES-HINT - [0:0]", ":KUBE-KUBELET-CANARY - [0:0]", ":KUBE-PROXY-CANARY - [0:0]",
        "COMMIT",
        "*filter",
        ":INPUT ACCEPT [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
        *[f":{c} - [0:0]" for c in ("FLANNEL-FWD", "KUBE-EXTERNAL-SERVICES", "KUBE-FIREWALL", "KUBE-FORWARD",
                                     "KUBE-KUBELET-CANARY", "KUBE-NODEPORTS", "KUBE-PROXY-CANARY",
                                     "KUBE-PROXY-FIREWALL", "KUBE-SERVICES")],
        '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
        "-j KUBE-PROXY-FIREWALL",
        '-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS',
        '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" '
        "-j KUBE-EXTERNAL-SERVICES",
        "-A INPUT -j KUBE-FIREWALL",
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
        "-j KUBE-PROXY-FIREWALL",
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" '
        "-j KUBE-EXTERNAL-SERVICES",
        '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
        "-j KUBE-PROXY-FIREWALL",
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        "-A OUTPUT -j KUBE-FIREWALL",
        '-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" '
        "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        *[f'-A FLANNEL-FWD -{d} {CLUSTER_CIDR} -m comment --comment "flanneld forward" -j ACCEPT' for d in "sd"],
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} -j ACCEPT',
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate '
        "RELATED,ESTABLISHED -j ACCEPT",
        "COMMIT",
        "*nat",
        ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]",
        *[f":{c} - [0:0]" for c in ("FLANNEL-POSTRTG", "KUBE-KUBELET-CANARY", "KUBE-MARK-MASQ", "KUBE-NODEPORTS",
                                     "KUBE-POSTROUTING", "KUBE-PROXY-CANARY", "KUBE-SERVICES", *chains)],
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
        *[f'-A FLANNEL-POSTRTG {m} -m comment --comment "flanneld masq" -j {t}' for m, t in flannel_masq(node)],
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark}",
        f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE '
        "--random-fully",
        *rules,
        "COMMIT",
        "",
    ])


def kube_proxy_sync(services: Iterable[Service] = SERVICES) -> str:
    """What a full sync of kube-proxy restores (``iptables-restore --noflush``): its own chains
    of the filter and nat tables, each declared (which empties it) and filled again; the
    built-in chains and their jumps, which it keeps by other means, are left alone."""
    out: list[str] = []
    table = ""
    for line in kube_proxy_rules(services).splitlines():
        if line.startswith("*"):
            table = line[1:]
        if table not in ("filter", "nat"):
            continue
        if line.startswith(("*", "COMMIT", ":KUBE-", "-A KUBE-")):
            out.append(line)
    return "\n".join([*out, ""])


# ---- the lab ----------------------------------------------------------------------------------------
SUFFIXES = ("c", "node", "node2", *[f"p{i}" for i in range(REPLICAS)], "cp")
NODE_SUFFIXES = ("node", "node2")
_SYSCTLS = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.ip_local_port_range='{} {}'".format(*EPHEMERAL_PORTS), "net.ipv4.tcp_tw_reuse=1"]


def banner(replica: int) -> str:
    """What replica ``replica`` says after 220."""
    return f"replica {replica} of {REPLICAS}"


@dataclass
class ServiceLab(Lab):
    """The nodes, the replicas and the clients (see the module's docstring). ``gw`` is node
    A, ``gateways`` both nodes: ``start_ftpalg``, ``ruleset``, ``expectations`` and the rest
    of ``Lab``'s gateway methods work on either."""

    prefix: str = "ftpalg-svc"
    hashes: dict[int, str] = field(default_factory=dict)
    """Replica -> SHA-256 of its ``FILE``."""

    @property
    def client(self) -> str:
        return f"{self.prefix}-c"

    @property
    def gw(self) -> str:
        return f"{self.prefix}-node"

    @property
    def node(self) -> str:
        return self.gw

    def pod(self, i: int) -> str:
        return f"{self.prefix}-p{i}"

    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(f"{self.prefix}-{s}" for s in SUFFIXES)

    @property
    def node2(self) -> str:
        return f"{self.prefix}-node2"

    @property
    def gateways(self) -> tuple[str, ...]:
        return (self.node, self.node2)

    def start_ftpalg_everywhere(self) -> list[subprocess.Popen[bytes]]:
        """``ftpalg run`` on every node (as a DaemonSet runs it), with ``FTPALG_ARGS``."""
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for gw in self.gateways:
                procs.append(self.start_ftpalg(*FTPALG_ARGS, gw=gw))
        except BaseException:
            self.stop_ftpalg_everywhere(procs)
            raise
        return procs

    def stop_ftpalg_everywhere(self, procs: list[subprocess.Popen[bytes]]) -> list[int]:
        """Stop them; their exit statuses."""
        return [self.stop_ftpalg(p) for p in procs]

    def rulesets(self) -> dict[str, tuple[str, str]]:
        """Node -> its nft ruleset and its iptables-save without comments and counters: what
        must be the same before ftpalg starts and after it exits."""
        out = {}
        for gw in self.gateways:
            saved = "".join(x for x in self.gw_rules(gw).splitlines(True) if not x.startswith("#"))
            out[gw] = (self.ruleset(gw), re.sub(r"\[\d+:\d+\]", "[0:0]", saved))
        return out

    def root(self, i: int) -> Path:
        """The files replica ``i`` serves."""
        return self.state / f"p{i}" / "pub"

    def up(self, servers: bool = True) -> None:
        self.down()
        try:
            self.state.mkdir(parents=True, exist_ok=True)
            self._build()
            for i in range(REPLICAS):
                root = self.root(i)
                root.mkdir(parents=True, exist_ok=True)
                root.parent.chmod(0o755)
                root.chmod(0o755)
                data = os.urandom(FILE_SIZE)
                (root / FILE).write_bytes(data)
                self.hashes[i] = hashlib.sha256(data).hexdigest()
            if servers:
                self.start_servers()
        except BaseException:
            self.down()
            raise

    def _build(self) -> None:
        p = self.prefix
        add_namespaces([f"{p}-{s}" for s in SUFFIXES],
                       [(f"{p}-c", "n0", f"{p}-node", "eth0"), (f"{p}-c", "n1", f"{p}-node2", "eth0"),
                        (f"{p}-node", "vethc", f"{p}-cp", "eth0"),
                        *[(f"{p}-{NODE_SUFFIXES[POD_NODE[i]]}", f"veth{i}", f"{p}-p{i}", "eth0")
                          for i in range(REPLICAS)]])
        scripts = self.state / "setup"
        scripts.mkdir(parents=True, exist_ok=True)
        routing = "net.ipv4.ip_forward=1 net.ipv4.icmp_ratelimit=0"
        jobs = []
        for n, suffix in enumerate(NODE_SUFFIXES):
            other = 1 - n
            eth0 = [f"{NODES[n]}/24"] + ([f"{LB_FTP}/32", f"{LB_CLASSIC}/32"] if n == 0 else [])
            pods = [f"veth{i}" for i in range(REPLICAS) if POD_NODE[i] == n] + (["vethc"] if n == 0 else [])
            jobs.append(self._script(suffix, [
                "set -e", f"sysctl -qw {' '.join(_SYSCTLS)} {routing} net.ipv4.conf.all.route_localnet=1",
                "h=/proc/sys/net/netfilter/nf_conntrack_helper; if [ -e $h ]; then echo 0 > $h; fi",
                "ip -batch - <<'EOF'", "link add cni0 type bridge",
                *link_batch({"eth0": eth0, "cni0": [f"{POD_NETS[n]}.1/24"]}),
                *[f"link set {v} master cni0 up" for v in pods],
                f"route add {POD_NETS[other]}.0/24 via {NODES[other]}",  # flannel's host-gw backend
                f"route add default via {ROUTER}", "EOF",
                "iptables-restore <<'EOF'", kube_proxy_rules(node=n).rstrip("\n"), "EOF"]))
        # the LAN: a plain switch (no netfilter on bridged frames), the client and the router on it
        jobs.append(self._script("c", [
            "set -e", f"sysctl -qw {' '.join(_SYSCTLS)} {routing} net.bridge.bridge-nf-call-iptables=0",
            "ip -batch - <<'EOF'", "link add lan type bridge", "link set n0 master lan up",
            "link set n1 master lan up", *link_batch({"lan": [f"{CLIENT}/24", f"{ROUTER}/24"]}),
            f"route add {LB_NET}.0/24 via {NODE_IP}",
            # the service network is not routed outside the cluster: answered here at once (a
            # TCP reset, not an ICMP error that a connecting socket may take as a soft one)
            f"route add local {SERVICE_CIDR} dev lo", "EOF"]))
        for pod, addr, node in [*[(f"p{i}", a, POD_NODE[i]) for i, a in enumerate(PODS)], ("cp", CLIENT_POD, 0)]:
            jobs.append(self._script(pod, ["set -e", f"sysctl -qw {' '.join(_SYSCTLS)}", "ip -batch - <<'EOF'",
                                           *link_batch({"eth0": [f"{addr}/24"]}),
                                           f"route add default via {POD_NETS[node]}.1", "EOF"]))
        run_all(jobs)

    def _script(self, suffix: str, lines: list[str]) -> tuple[list[str], None]:
        path = self.state / "setup" / f"{suffix}.sh"
        path.write_text("\n".join(lines) + "\n")
        return ["ip", "netns", "exec", f"{self.prefix}-{suffix}", "sh", str(path)], None

    def start_servers(self) -> None:
        """Two vsftpd in every replica: the default one on 21, the "classic" one on 2121."""
        started = []
        want: dict[str, list[tuple[str, int]]] = {}
        for i, addr in enumerate(PODS):
            extra = f"ftpd_banner={banner(i)}"
            classic = f"{extra}\npasv_min_port={PASSIVE_RANGE[0]}\npasv_max_port={PASSIVE_RANGE[1]}"
            for port, conf, pasv in ((21, extra, None), (CLASSIC_PORT, classic, LB_CLASSIC)):
                state = self.state / f"p{i}" / f"vsftpd-{port}"
                argv = servers.server_command("vsftpd", addr, self.root(i), state, port, pasv, conf)
                started.append(self.popen(self.pod(i), argv, state / "server.out", stdin_log=True))
                want.setdefault(self.pod(i), []).append((addr, port))
        self.wait_ports(want, watch=started)

    # ---- sessions -----------------------------------------------------------------------------
    def sessions(self, entry: str, client: str, mode: str, n: int,
                 timeout: float = 5.0) -> list[SessionResult]:
        """Run ``n`` sessions one after the other from the client of ``ENTRIES[entry]`` to its address,
        each downloading ``FILE`` with ``client`` ("ftplib" or "curl") in ``mode`` (see
        ``service_clients.MODES``)."""
        return self.sessions_start(entry, client, mode, n, timeout).result()

    def matrix(self, cells: dict[Cell, int], parallel: int = 8,
               timeout: float = 5.0) -> dict[Cell, list[SessionResult]]:
        """As many sessions of each cell as ``cells`` says; up to ``parallel`` cells at a time."""
        todo = list(cells.items())
        running: list[tuple[Cell, Sessions]] = []
        out: dict[Cell, list[SessionResult]] = {}
        try:
            while todo or running:
                while todo and len(running) < parallel:
                    c, n = todo.pop(0)
                    running.append((c, self.sessions_start(c.entry, c.client, c.mode, n, timeout)))
                c, s = running.pop(0)
                out[c] = s.result()
        finally:
            for _, s in running:
                s.proc.kill()
                s.proc.communicate()
        return out

    def sessions_start(self, entry: str, client: str, mode: str, n: int, timeout: float = 5.0) -> Sessions:
        where, host, port = ENTRIES[entry]
        argv = ["ip", "netns", "exec", f"{self.prefix}-{where}", sys.executable, "-m", "ftpalg.lab.service_clients",
                client, mode, host, str(port), FILE, str(n), "--timeout", str(timeout)]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return Sessions(self, p, n * (2 * timeout + 5) + 10)


@dataclass(frozen=True)
class Cell:
    """Sessions of one kind: to ``ENTRIES[entry]`` with ``client`` in ``mode``."""

    entry: str
    client: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.entry} {self.client} {self.mode}"


@dataclass(frozen=True)
class SessionResult:
    """One session: the replica its control connection reached (from the banner; None if it
    never got one), the SHA-256 of what it downloaded (None if nothing), the error if any."""

    replica: int | None
    sha256: str | None
    error: str

    def reached(self, lab: ServiceLab) -> int | None:
        """The replica whose file the data connection brought, or None."""
        return next((i for i, h in lab.hashes.items() if h == self.sha256), None)

    def own_replica(self, lab: ServiceLab) -> bool:
        """The download is the file of the replica of its own control connection."""
        return self.replica is not None and self.reached(lab) == self.replica

    def outcome(self, lab: ServiceLab) -> str:
        """"ok", "wrong replica" or the error."""
        if self.own_replica(lab):
            return "ok"
        if self.reached(lab) is not None:
            return "wrong replica"
        return self.error or "no file"


@dataclass
class Sessions:
    """Sessions running in the client namespace; ``result()`` waits for them."""

    lab: ServiceLab
    proc: subprocess.Popen[str]
    timeout: float

    def result(self) -> list[SessionResult]:
        try:
            out, err = self.proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        results = []
        for line in out.splitlines():
            d = json.loads(line)
            results.append(SessionResult(d["replica"], d["sha256"], d["error"]))
        if self.proc.returncode != 0 and not results:
            results.append(SessionResult(None, None, f"client program failed ({self.proc.returncode}): "
                                                    f"{err.strip()[-500:]}"))
        return results
