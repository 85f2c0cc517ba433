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
import re
from collections import Counter

import pytest

from ftpalg.lab.netns import run
from ftpalg.lab.service import (
    CONTROL_PORTS,
    ENTRIES,
    PASSIVE_RANGE,
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


def saved(lab: ServiceLab) -> str:
    """The node's iptables-save without its comments and counters."""
    return re.sub(r"\[\d+:\d+\]", "[0:0]", "".join(x for x in lab.gw_rules().splitlines(True) if x[0] != "#"))


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


def test_with_ftpalg_every_data_connection_reaches_its_own_replica(svc):
    before = svc.ruleset(), saved(svc)
    p = svc.start_ftpalg(*[a for port in CONTROL_PORTS for a in ("--control-port", str(port))])
    try:
        results = svc.matrix(CELLS)
    finally:
        rc = svc.stop_ftpalg(p)
    print(table(svc, results))
    log = svc.ftpalg_log()
    assert rc == 0 and "Traceback" not in log
    for c, rs in results.items():
        assert [r.outcome(svc) for r in rs] == ["ok"] * CELLS[c], c
    for entry in ENTRIES:
        assert {r.replica for r in by_entry(results, entry)} == set(range(REPLICAS)), entry
    assert log.count("pinhole open") == sum(CELLS.values())
    assert (svc.ruleset(), saved(svc)) == before
    assert not svc.expectations()


def test_kube_proxy_syncs_under_ftpalg(svc):
    """kube-proxy rewrites its chains at every sync (every endpoint change, and at least
    hourly): ftpalg's rules stay, and sessions go on reaching their own replica, also while the
    endpoints are listed in another order (other replicas behind each KUBE-SEP chain)."""
    before = svc.ruleset(), saved(svc)
    p = svc.start_ftpalg(*[a for port in CONTROL_PORTS for a in ("--control-port", str(port))])
    try:
        ours = svc.ruleset()
        shuffled = [dataclasses.replace(s, endpoints=s.endpoints[::-1]) for s in SERVICES]
        for text in (kube_proxy_sync(shuffled), kube_proxy_sync()):
            run(["ip", "netns", "exec", svc.node, "iptables-restore", "--noflush", "-w", "5"], input=text)
            assert "-A PREROUTING -j FTPALG-QUEUE" in svc.gw_rules()
            assert (svc.ruleset() == ours) == (text == kube_proxy_sync())  # the shuffle changed the rules
            cells = {Cell(e, "ftplib", m): 3 for e in ("lb", "lb-classic") for m in ("PASV", "EPSV", "PORT")}
            results = svc.matrix(cells)
            assert all(r.own_replica(svc) for rs in results.values() for r in rs), table(svc, results)
        assert svc.ruleset() == ours
    finally:
        rc = svc.stop_ftpalg(p)
    assert rc == 0
    assert (svc.ruleset(), saved(svc)) == before
