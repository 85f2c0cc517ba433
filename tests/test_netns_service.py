"""An FTP service load-balanced by kube-proxy's iptables rules (``ftpalg.lab.service``): three
vsftpd replicas, each serving a file of its own, behind a node whose nat table picks a replica
per connection at random (``-m statistic --mode random``), DNATs to it and masquerades the
outside client. Sessions of every data-connection mode from the outside client, to a
load-balancer IP that publishes only port 21, to one that publishes the passive range as well
(as FTP images tell Kubernetes users), and to a NodePort; and from a client pod to the
ClusterIP. Without an ALG, from outside, every mode fails or reaches another replica (from the
pod: PASV with the 227 address, PORT and EPRT work, the others fail); with ``ftpalg run`` on
the node (its control ports: 21 and the NodePort) every data connection reaches the replica
of its own control connection, told by the banner of the control connection and the SHA-256
of what the data connection brought."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

import pytest

from ftpalg.lab.netns import run
from ftpalg.lab.service import (
    ENTRIES,
    FTPALG_ARGS,
    PASSIVE_RANGE,
    POD_NODE,
    REPLICAS,
    SERVICES,
    Cell,
    ServiceLab,
    SessionResult,
    kube_proxy_sync,
    port_proto_hash,
)
from ftpalg.lab.service_clients import CLIENTS, MODES

pytestmark = pytest.mark.netns

N = 12
"""ftplib's sessions per cell with ftpalg, and without it where the balancing alone decides
(lb-classic): were each data connection balanced on its own, all 12 would reach the control
connection's replica with a chance of 3**-12 (1 in 531,441)."""
N_CURL = 4
"""curl's sessions per cell (one curl process each): the same, fewer, for the time."""
N_FIXED = 3
"""Sessions per cell without ftpalg where the outcome does not depend on the balancing."""
CELLS = {Cell(e, c, m): N if c == "ftplib" else N_CURL for e in ENTRIES for c in CLIENTS for m in MODES}
CELLS_WITHOUT = {c: n if c.entry == "lb-classic" else N_FIXED for c, n in CELLS.items()}
PASSIVE = ("PASV", "PASV-PEER", "EPSV")


def test_chain_names_are_kube_proxys():
    """Values printed by kube-proxy's own tests and real clusters' iptables-save."""
    assert port_proto_hash("kube-system/kube-dns:dns", "udp") == "TCOU7JCQXEZGVUNU"
    assert port_proto_hash("default/kubernetes:https") == "NPX46M4PTMTKRN6Y"


@pytest.fixture(scope="module")
def svc():
    lab = ServiceLab(f"fn{os.getpid()}")
    lab.up()
    yield lab
    lab.down()
    assert not lab.exists()


def table(lab: ServiceLab, results: dict[Cell, list[SessionResult]]) -> str:
    return "\n".join(f"{c.label:<28} {dict(Counter(r.outcome(lab) for r in rs))}" for c, rs in results.items())


def test_the_node_has_kube_proxys_ruleset(svc):
    rules = svc.gw_rules()
    h = port_proto_hash("ftp/ftp:control")
    svc_rules = [r for r in rules.splitlines() if r.startswith(f"-A KUBE-SVC-{h} ")]
    assert "--probability 0.33333333349" in svc_rules[1] and "--probability 0.50000000000" in svc_rules[2]
    assert "statistic" not in svc_rules[3] and len(svc_rules) == 4
    assert f"-A KUBE-EXT-{h} -m comment --comment \"masquerade traffic for ftp/ftp:control external " \
           "destinations\" -j KUBE-MARK-MASQ" in rules
    assert "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000" in rules
    assert "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" " \
           "-j MASQUERADE --random-fully" in rules
    last = PASSIVE_RANGE[1]
    assert f"--dport {last} -j KUBE-EXT-{port_proto_hash(f'ftp/ftp-classic:pasv-{last}')}" in rules


def by_entry(results: dict[Cell, list[SessionResult]], entry: str, modes: tuple[str, ...] = MODES,
             ) -> list[SessionResult]:
    return [r for c, rs in results.items() if c.entry == entry and c.mode in modes for r in rs]


def test_without_an_alg_no_data_connection_is_tied_to_its_control_connection(svc):
    results = svc.matrix(CELLS_WITHOUT)
    print(table(svc, results))
    for c, rs in results.items():
        assert len(rs) == CELLS_WITHOUT[c], c
        assert all(r.replica is not None for r in rs), (c, rs)  # every control connection got in
        if c.entry == "clusterip":
            # a pod: 227 names a pod it can reach; not masqueraded, its own address in PORT is
            # accepted; a data port of the service IP leads nowhere
            if c.mode in ("PASV", "PORT", "EPRT"):
                assert all(r.own_replica(svc) for r in rs), (c, rs)
            else:
                assert not any(r.own_replica(svc) for r in rs), (c, rs)
        elif not (c.entry == "lb-classic" and c.mode in PASSIVE):
            # from outside, active: the replica sees the client masqueraded and refuses its
            # address; passive: 227 names the pod, or the data port is not published
            assert not any(r.own_replica(svc) for r in rs), (c, rs)
    for entry in ENTRIES:  # the control connections were balanced among all replicas
        assert {r.replica for r in by_entry(results, entry)} == set(range(REPLICAS)), entry
    # The passive range published: each data connection is balanced on its own, to the control
    # connection's replica a third of the time (48 sessions: more than 36 has a chance < 1e-9).
    classic = by_entry(results, "lb-classic", PASSIVE)
    assert sum(r.own_replica(svc) for r in classic) <= 0.75 * len(classic)


def test_ftpalg_on_the_ingress_node_only_is_not_enough(svc):
    """Without ftpalg on the node of a replica, flannel's masquerade of the pods' own traffic
    takes the replica's active data connection: it leaves that node from the node's address,
    not from the one the pinhole on the ingress node waits for. Passive sessions and the
    replicas of the ingress node work."""
    p = svc.start_ftpalg(*FTPALG_ARGS)
    try:
        results = svc.matrix({Cell(e, "ftplib", m): 8 for e in ("lb", "nodeport") for m in ("PORT", "EPRT", "EPSV")})
    finally:
        assert svc.stop_ftpalg(p) == 0
    print(table(svc, results))
    sessions = [(c, r) for c, rs in results.items() for r in rs]
    elsewhere = [(c, r) for c, r in sessions if POD_NODE[r.replica] == 1]
    assert any(c.mode != "EPSV" for c, _ in elsewhere)  # none of 32 there: a chance of (2/3)**32
    for c, r in sessions:
        assert r.own_replica(svc) == (c.mode == "EPSV" or POD_NODE[r.replica] == 0), (c, r)
        if not r.own_replica(svc):
            assert "425" in r.error


@pytest.fixture(scope="module")
def daemonset(svc):
    """``ftpalg run`` on both nodes, as a DaemonSet runs it, for the rest of the module; at its
    end both exit cleanly and leave each node's ruleset as they found it."""
    before = svc.rulesets()
    procs = svc.start_ftpalg_everywhere()
    try:
        yield procs
    finally:
        rcs = svc.stop_ftpalg_everywhere(procs)
    assert rcs == [0, 0]
    assert not any("Traceback" in svc.ftpalg_log(gw) for gw in svc.gateways)
    assert svc.rulesets() == before
    assert not any(svc.expectations(gw) for gw in svc.gateways)


def test_with_ftpalg_every_data_connection_reaches_its_own_replica(svc, daemonset):
    results = svc.matrix(CELLS)
    print(table(svc, results))
    bad = [(c, o) for c, rs in results.items() for o in (r.outcome(svc) for r in rs) if o != "ok"]
    # One active session may fail at the replica itself: vsftpd connects from port 20, and a
    # connection from port 20 to the same node address and port may still be in TIME_WAIT
    # there (the likely cause of a "425 Failed to establish connection" seen about once in ten
    # runs of the suite, in PORT or EPRT, never twice; not ftpalg's: a pinhole missing or
    # wrong fails every session of its cell, without ftpalg every one of the cell fails).
    assert not bad or (len(bad) == 1 and bad[0][0].mode in ("PORT", "EPRT")
                       and bad[0][1].startswith("425 Failed to establish connection")), bad
    assert sum(len(rs) for rs in results.values()) == sum(CELLS.values())
    for entry in ENTRIES:
        assert {r.replica for r in by_entry(results, entry)} == set(range(REPLICAS)), entry
    # node A, where every session comes in, opens a pinhole for each; node B, which forwards
    # (without NAT) the sessions of the replica it holds, one for each of those, but where the
    # 227 names the load balancer's address (vsftpd's pasv_address), which node B does not
    # know of: it refuses that one (harmless: the data connection passes node B as any other)
    logs = [svc.ftpalg_log(gw) for gw in svc.gateways]
    assert logs[0].count("pinhole open") == sum(CELLS.values())
    on_b = [(c, r) for c, rs in results.items() for r in rs if POD_NODE[r.replica] == 1]
    foreign_227 = [(c, r) for c, r in on_b if c.entry == "lb-classic" and c.mode in ("PASV", "PASV-PEER")]
    assert logs[1].count("pinhole open") == len(on_b) - len(foreign_227)
    assert logs[1].count("address is neither the server's nor the public address") == len(foreign_227)


def test_kube_proxy_syncs_under_ftpalg(svc, daemonset):
    """kube-proxy rewrites its chains at every sync (every endpoint change, and at least
    hourly): ftpalg's rules stay, and sessions go on reaching their own replica, also while the
    endpoints are listed in another order (other replicas behind each KUBE-SEP chain)."""
    ours = svc.ruleset()
    shuffled = [dataclasses.replace(s, endpoints=s.endpoints[::-1]) for s in SERVICES]
    for text in (kube_proxy_sync(shuffled), kube_proxy_sync()):
        for node in svc.gateways:
            run(["ip", "netns", "exec", node, "iptables-restore", "--noflush", "-w", "5"], input=text)
            assert "-A PREROUTING -j FTPALG-QUEUE" in svc.gw_rules(node)
        assert (svc.ruleset() == ours) == (text == kube_proxy_sync())  # the shuffle changed the rules
        cells = {Cell(e, "ftplib", m): 2 for e in ("lb", "lb-classic") for m in ("PASV", "EPSV", "PORT")}
        results = svc.matrix(cells)
        assert all(r.own_replica(svc) for rs in results.values() for r in rs), table(svc, results)
    assert svc.ruleset() == ours
