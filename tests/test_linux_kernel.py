"""``LinuxKernel``, the core's kernel port: against the model of the kernel's netlink side
(no root), then against a real kernel in two network namespaces (a client, and a host
with ftpalg's nft table and a listener on port 21: mapping, corrections, expectations)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_ctnetlink import KEY, KEY2, REPLY, KernelSocket

from ftpalg.core.kernel import Pinhole, PinholeBusy
from ftpalg.core.seqadj import KernelAdj
from ftpalg.linux import ctnetlink as ct
from ftpalg.linux.kernel import LinuxKernel

PH = Pinhole(id=1, peer="203.0.113.2", public="203.0.113.1", public_port=50000, inside="10.0.0.2",
             inside_port=50000, expires=0.0, master=KEY, active=True, form="PORT")
PH2 = dataclasses.replace(PH, id=2, public_port=50001)
# the same tuple as PH's, announced on another control connection
PH2_SAME_TUPLE = dataclasses.replace(PH, id=2, master=KEY2)


@pytest.fixture
def kernel():
    nl = ct.CtNetlink()
    nl._sock.close()
    nl._sock = KernelSocket()  # type: ignore[assignment]
    return LinuxKernel(nl, 120.0)


def test_mapping_and_corrections_read_and_known(kernel):
    assert kernel.mapping(KEY) == (REPLY, False)
    first = kernel.seq_adjust(KEY, 1, 1000, 5, None)  # read, update, check
    assert first == KernelAdj(1000, 0, 5) and kernel.mapping(KEY) == (REPLY, True)
    sock = kernel.nl._sock
    sock.sends.clear()
    assert kernel.seq_adjust(KEY, 1, 2000, 3, first) == KernelAdj(2000, 5, 8)
    assert sock.sends == [[ct.NFNL_SUBSYS_CTNETLINK << 8]]  # known: the update alone


def test_corrections_read(kernel):
    sock = kernel.nl._sock
    assert kernel.seq_state(KEY, 0) == KernelAdj() and sock.sends[-1] == [ct.NFNL_SUBSYS_CTNETLINK << 8
                                                                          | ct.IPCTNL_MSG_CT_GET]
    first = kernel.seq_adjust(KEY, 1, 1000, 5, None)
    assert kernel.seq_state(KEY, 1) == first and kernel.seq_state(KEY, 0) == KernelAdj()


def test_a_failed_look_up_is_no_mapping(kernel, caplog):
    def broken(size):
        raise OSError(errno.EIO, "broken")

    kernel.nl._sock.recv = broken
    assert kernel.mapping(KEY) is None and kernel.mapping(KEY) is None
    assert kernel.lookup_failures == 2 and caplog.text.count("conntrack look-up failed") == 1


def test_expect_busy_and_withdraw(kernel, caplog):
    sock = kernel.nl._sock
    handle = sock._handle
    new_exp = ct.NFNL_SUBSYS_CTNETLINK_EXP << 8 | ct.IPCTNL_MSG_EXP_NEW
    sock._handle = lambda mtype, body, seq: errno.EEXIST if mtype == new_exp else handle(mtype, body, seq)
    with pytest.raises(PinholeBusy):
        kernel.expect(PH)
    assert not kernel.kernel_ids  # nothing of it to delete
    sock._handle = handle
    kernel.expect(PH)
    kernel.withdraw(PH, used=False)  # deleted, as itself
    assert not sock.expectations and not kernel.kernel_ids
    kernel.expect(PH)
    sock.consume(bytes([203, 0, 113, 2]), bytes([203, 0, 113, 1]), 50000)  # used: the kernel removed it
    kernel.withdraw(PH, used=True)  # not waited for; its ENOENT read later and ignored
    sends = len(sock.sends)
    kernel.withdraw(PH, used=True)  # withdrawn already: nothing sent
    kernel.withdraw(PH, used=False)
    assert len(sock.sends) == sends
    assert kernel.mapping(KEY) is not None and kernel.close_failures == 0
    sock._handle = lambda mtype, body, seq: (errno.EPERM if mtype & 0xFF == ct.IPCTNL_MSG_EXP_DELETE
                                             else handle(mtype, body, seq))
    kernel.expect(PH)
    kernel.withdraw(PH, used=False)  # counted and logged, not raised
    kernel.expect(PH2)
    kernel.withdraw(PH2, used=True)  # counted when read
    assert kernel.close_failures == 1
    kernel.mapping(KEY)
    assert kernel.close_failures == 2 and "pinhole_close_failed id=1" in caplog.text
    assert "pinhole_close_failed id=2" in caplog.text


def test_two_workers_withdraw_only_their_own(kernel):
    """Two workers (two sockets, one kernel table): worker A's pinhole is used, worker B
    opens one of the same tuple on its own control connection, then A withdraws its own,
    late (used, not waited for; or waited for): B's stays until B withdraws it. The same
    within one worker."""
    other = LinuxKernel(ct.CtNetlink(), 120.0)
    other.nl._sock.close()
    other.nl._sock = KernelSocket()  # type: ignore[assignment]
    table = kernel.nl._sock.expectations
    other.nl._sock.expectations = table  # the kernel's one table
    theirs = dataclasses.replace(PH, master=KEY2)  # worker B's own pinhole 1, of the same tuple
    for used in (True, False):
        for b, second in ((other, theirs), (kernel, PH2_SAME_TUPLE)):
            kernel.expect(PH)
            kernel.nl._sock.consume(bytes([203, 0, 113, 2]), bytes([203, 0, 113, 1]), 50000)
            b.expect(second)
            kernel.withdraw(PH, used)
            kernel.mapping(KEY)  # its answer read, if it was not waited for
            assert len(table) == 1 and kernel.close_failures == 0
            b.withdraw(second, used=False)
            assert not table and b.close_failures == 0


# ---- a real kernel --------------------------------------------------------------------------
CLIENT, GW_C, GW_S, SERVER = "10.231.0.1", "10.231.0.2", "10.231.1.2", "10.231.1.1"
HOLD = "import socket, sys\n{}\nprint(port, flush=True)\nsys.stdin.read()"
LISTEN = HOLD.format("ls = socket.create_server((sys.argv[1], 21)); port = 21")
CONNECT = HOLD.format("s = socket.create_connection((sys.argv[1], 21)); port = s.getsockname()[1]")
IN_GATEWAY = textwrap.dedent("""
    import json, socket, subprocess, sys
    from ftpalg.core.kernel import Pinhole, PinholeBusy
    from ftpalg.linux.ctnetlink import CtNetlink, ExpectationEvents
    from ftpalg.linux.kernel import LinuxKernel

    client, cport, server, public, cport2 = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    a = socket.inet_aton
    key = (a(client), cport, a(server), 21)
    nl = CtNetlink()
    k = LinuxKernel(nl, 120.0)
    (reply, corrected) = k.mapping(key)
    out = {"none": k.mapping((a(client), cport + 1, a(server), 21)),
           "mapping": [[socket.inet_ntoa(reply[0]), reply[1], socket.inet_ntoa(reply[2]), reply[3]], corrected]}
    first = k.seq_adjust(key, 1, 1000, 5, None)
    then = k.seq_adjust(key, 1, 2000, 3, first)
    held = nl.get(key).seqadj[1]
    out["adj"] = [[x.pos, x.before, x.after] for x in (first, then, held, k.seq_state(key, 1), k.seq_state(key, 0))]
    out["corrected"] = k.mapping(key)[1]
    # a passive command handed over for the next ftpalg, in the entry's labels, the others kept
    nl.label(key, 127, True)
    k.hand_over(key, b"LPSV")
    out["handed"] = [k.by_reply(reply).awaiting.decode(), f"{nl.get(key).labels:x}"]
    k.hand_over(key, b"EPSV")
    out["handed"].append(k.by_reply(reply).awaiting.decode())
    k.hand_over(key, b"")
    out["handed"] += [k.by_reply(reply).awaiting.decode(), f"{nl.get(key).labels:x}"]
    nl.label(key, 127, False)
    ph = Pinhole(id=7, peer=server, public=public, public_port=50000, inside=client, inside_port=50000,
                 expires=0.0, master=key, active=True, form="PORT")

    def expectations():
        r = subprocess.run(["conntrack", "-L", "expect"], capture_output=True, text=True)
        return [line for line in r.stdout.splitlines() if "dport=50000" in line]

    k.expect(ph)
    out["expected"] = expectations()
    k.expect(ph)  # the same control connection's expectation already there: adopted (a restart)
    out["adopted"] = expectations()
    other = Pinhole(id=8, peer=server, public=public, public_port=50000, inside=client, inside_port=50000,
                    expires=0.0, master=(a(client), cport2, a(server), 21), active=True, form="PORT")
    try:
        k.expect(other)  # another control connection's: busy
        out["busy"] = False
    except PinholeBusy:
        out["busy"] = True
    k.withdraw(ph, used=False)
    out["after_withdraw"] = expectations()
    k.expect(ph)
    k.withdraw(ph, used=True)
    out["after_used"] = expectations()
    k.withdraw(ph, used=True)  # gone: its ENOENT is read with the next answer, and ignored
    k.withdraw(ph, used=False)
    k.mapping(key)
    out["close_failures"] = k.close_failures
    # another worker (its own socket) announces the same port to the same peer on another
    # control connection once this one's expectation is gone (used): this one's withdraw,
    # late, leaves the other's alone
    key2 = (a(client), cport2, a(server), 21)
    k2 = LinuxKernel(CtNetlink(), 120.0)
    theirs = Pinhole(id=7, peer=server, public=public, public_port=50000, inside=client, inside_port=50000,
                     expires=0.0, master=key2, active=True, form="PORT")
    out["spared"] = []
    for used in (True, False):
        k.expect(ph)
        nl.unexpect(a(server), a(public), 50000)  # gone as if used (by tuple, as a matching SYN takes it)
        k2.expect(theirs)
        k.withdraw(ph, used)
        k.mapping(key)  # the answer of a delete not waited for read
        out["spared"].append(expectations())
        k2.withdraw(theirs, used=False)
    out["after_theirs"] = expectations()
    out["close_failures"] += k.close_failures + k2.close_failures
    # the kernel's removals reach every worker's events socket: this one's pinhole used, then
    # the port announced again on the other connection (by the other worker, or by this one
    # after a new announcement) before the removal is read: the new pinhole is not taken for
    # the used one
    ev, ev2 = ExpectationEvents(), ExpectationEvents()
    k.expect(ph)
    nl.unexpect(a(server), a(public), 50000)  # used
    k2.expect(theirs)
    out["gone_elsewhere"] = k2.gone(ev2.read())
    out["gone_own"] = k.gone(ev.read())
    nl.unexpect(a(server), a(public), 50000)  # theirs used
    out["gone_theirs"] = k2.gone(ev2.read())
    print(json.dumps(out))
""")


# the kernel gives a connection with a helper its sequence-adjustment extension when NAT changes it
MASQUERADE = """
table ip nat {
    chain post {
        type nat hook postrouting priority srcnat;
        oifname "gs" masquerade
    }
}
"""
# a rule that tests a label: the kernel gives new connections the labels extension
LABELS = """
table ip labelled {
    chain pre {
        type filter hook prerouting priority 0;
        ct label 127 counter
    }
}
"""


@pytest.fixture
def routed():
    """Client -- gateway (ftpalg's nft table, masquerade) -- server, three namespaces named
    after the pid."""
    from ftpalg.linux.rules import nft_rules

    c, g, s = (f"fk{os.getpid()}-{n}" for n in ("c", "gw", "s"))

    def run(*argv, **kw):
        return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)

    try:
        for ns in (c, g, s):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        for ns, dev, addr, gw_dev, gw_addr in ((c, "c0", CLIENT, "gc", GW_C), (s, "s0", SERVER, "gs", GW_S)):
            run("ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", gw_dev, "netns", g)
            run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            run("ip", "-n", g, "addr", "add", f"{gw_addr}/24", "dev", gw_dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", g, "link", "set", gw_dev, "up")
            run("ip", "-n", ns, "route", "add", "default", "via", gw_addr)
        run("ip", "netns", "exec", g, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # events for the connections made before a listener exists (the script's own sockets)
        run("ip", "netns", "exec", g, "sysctl", "-qw", "net.netfilter.nf_conntrack_events=1")
        run("ip", "netns", "exec", g, "nft", "-f", "-", input=nft_rules([21]) + MASQUERADE + LABELS)
        yield c, g, s
    finally:
        for ns in (c, g, s):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.netns
def test_linux_kernel_on_a_real_connection(routed):
    c, g, s = routed
    held, ports = [], []
    try:
        for ns, script in ((s, LISTEN), (c, CONNECT), (c, CONNECT)):
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", script, SERVER],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            held.append(p)
            ports.append(p.stdout.readline().strip())  # listening / connected before the next
        cports = ports[1:]
        res = subprocess.run(["ip", "netns", "exec", g, sys.executable, "-c", IN_GATEWAY, CLIENT, cports[0], SERVER,
                              GW_S, cports[1]],
                             capture_output=True, text=True, timeout=60)
    finally:
        for p in held:
            p.stdin.close()
            p.wait(10)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["none"] is None
    (reply, corrected) = out["mapping"]
    assert reply[:3] == [SERVER, 21, GW_S] and not corrected  # masqueraded; no correction yet
    assert out["adj"] == [[1000, 0, 5], [2000, 5, 8], [2000, 5, 8], [2000, 5, 8], [0, 0, 0]] and out["corrected"]
    same = [[e.split(" ", 1)[1] for e in out[k]] for k in ("expected", "adopted")]  # (less the seconds left)
    assert len(out["expected"]) == 1 and same[0] == same[1] and out["busy"]
    assert out["after_withdraw"] == [] and out["after_used"] == [] and out["close_failures"] == 0
    for spared in out["spared"]:  # the other connection's expectation, still there
        assert len(spared) == 1 and f"master-src={CLIENT} master-dst={SERVER} sport={cports[1]} dport=21" in spared[0]
    assert out["after_theirs"] == []
    assert out["handed"] == ["LPSV", "8030" + "0" * 28, "EPSV", "", "8" + "0" * 31]
    assert out["gone_elsewhere"] == [] and out["gone_own"] == [7] and out["gone_theirs"] == [7]
