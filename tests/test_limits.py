"""The policy's switches and caps in the core: port floor, flows, SYNs, pinholes per client
and in total, held bytes, and AUTH TLS. What happens at each cap: the control connection
passes untouched, nothing opens, the reason is counted."""

from __future__ import annotations

import pytest

from alg_helpers import Conn, Driven, FakeKernel
from ftpalg.core.policy import Limits

PORT = b"PORT 10,0,0,2,195,80\r\n"  # 10.0.0.2:50000
PORT_OUT = b"PORT 203,0,113,1,195,80\r\n"


def make(**kw):
    nat = holes = FakeKernel()
    return Driven(nat, limits=Limits(**kw)), nat, holes


def login(conn):
    conn.s(b"220 hello\r\n")
    conn.c(b"USER anonymous\r\n")
    conn.s(b"331 ok\r\n")


@pytest.mark.parametrize("line, port", [
    (b"PORT 10,0,0,2,0,25\r\n", 25),
    (b"EPRT |1|10.0.0.2|22|\r\n", 22),
    (b"PORT 10,0,0,2,3,255\r\n", 1023),
])
def test_port_below_the_floor_opens_nothing_and_passes_unchanged(line, port):
    alg, nat, holes = make()
    conn = Conn(alg, nat)
    login(conn)
    assert conn.c(line).payload == line
    assert not holes.live and alg.counters["refused"] == 1
    conn.s(b"200 ok\r\n")
    assert conn.c(PORT).payload == PORT_OUT  # the session goes on and is helped
    assert len(holes.live) == 1


def test_floor_applies_to_passive_replies_and_is_a_switch():
    for floor, opened in ((1024, 0), (1, 1)):
        alg, nat, holes = make(min_port=floor)
        conn = Conn(alg, nat, server=("192.168.1.5", 21), dest=("198.51.100.1", 21),
                    public=("10.0.0.2", 40000))
        login(conn)
        conn.c(b"PASV\r\n")
        conn.s(b"227 Entering Passive Mode (192,168,1,5,0,22)\r\n")
        assert len(holes.live) == opened
        assert alg.counters["refused"] == 1 - opened


def test_first_dynamic_port_is_allowed():
    alg, nat, holes = make()
    conn = Conn(alg, nat)
    login(conn)
    assert conn.c(b"PORT 10,0,0,2,4,0\r\n").payload == b"PORT 203,0,113,1,4,0\r\n"  # 1024


def test_limits_are_validated():
    with pytest.raises(ValueError):
        Limits(min_port=0)
    with pytest.raises(ValueError):
        Limits(max_flows=0)


def test_a_syn_costs_no_flow_and_the_syn_fifo_is_bounded():
    alg, nat, holes = make(max_flows=50)
    for i in range(200):
        Conn(alg, nat, client=("10.0.0.2", 20000 + i), handshake=False).c(b"", "S")
    assert alg.tracked == 0 and not alg.flows
    assert len(alg.syns) == 50 and alg.counters["syns_forgotten"] == 150


def test_handshake_then_reset_leaves_nothing():
    alg, nat, holes = make()
    for i in range(100):
        conn = Conn(alg, nat, client=("10.0.0.2", 20000 + i))
        conn.c(b"", "R")
    assert alg.tracked == 0 and not alg.flows and not alg.syns


def test_closed_flow_without_corrections_is_forgotten_at_once_but_a_corrected_one_is_kept():
    alg, nat, holes = make()
    plain = Conn(alg, nat, client=("10.0.0.2", 20001))
    login(plain)
    plain.c(b"QUIT\r\n", "FA")
    plain.s(b"221 bye\r\n", "FA")
    helped = Conn(alg, nat, client=("10.0.0.2", 20002))
    login(helped)
    helped.c(PORT)
    helped.c(b"QUIT\r\n", "FA")
    helped.s(b"221 bye\r\n", "FA")
    assert alg.tracked == 1  # late retransmissions of the corrected one still need its history
    assert not holes.live


def test_flow_cap_evicts_the_least_recently_seen_and_keeps_helping():
    alg, nat, holes = make(max_flows=32)
    conns = []
    for i in range(32):
        conn = Conn(alg, nat, client=("10.0.0.2", 20000 + i))
        conn.now = float(i)
        login(conn)
        conns.append(conn)
    assert alg.tracked == 32
    late = Conn(alg, nat, client=("10.0.0.2", 30000))
    late.now = 100.0
    login(late)
    assert alg.counters["flows_evicted"] == 2 and alg.tracked == 31  # 32 // 16 oldest forgotten, one added
    assert late.c(PORT).payload == PORT_OUT
    # an evicted one seen again goes on from where its streams stood: at a line start here
    first = conns[0]
    first.now = 101.0
    assert first.c(b"PORT 10,0,0,2,195,81\r\n").payload == b"PORT 203,0,113,1,195,81\r\n"


def test_a_flow_evicted_mid_line_is_not_read_until_the_line_ends():
    alg, nat, holes = make(max_flows=16)
    victim = Conn(alg, nat, client=("10.0.0.2", 19999))
    login(victim)
    victim.c(b"NOOP xx")  # a line begun, not ended
    for i in range(16):
        login(Conn(alg, nat, client=("10.0.0.3", 20000 + i)))
    assert alg.counters["flows_evicted"] >= 1 and victim.key not in alg.flows
    assert victim.c(PORT).payload == PORT  # the rest of that line, not a line of its own
    victim.s(b"500 what\r\n")
    assert victim.c(b"PORT 10,0,0,2,195,82\r\n").payload == b"PORT 203,0,113,1,195,82\r\n"


def test_flow_cap_with_nothing_to_evict_passes_new_connections_untouched():
    alg, nat, holes = make(max_flows=2)
    for i in range(2):
        conn = Conn(alg, nat, client=("10.0.0.2", 20000 + i))
        login(conn)
        conn.c(PORT)  # a live pinhole: not evictable
    extra = Conn(alg, nat, client=("10.0.0.2", 30000))
    login(extra)
    assert extra.c(PORT).payload == PORT  # untouched: no rewrite, no pinhole
    assert alg.counters["flow_cap"] >= 1 and len(holes.live) == 2


def test_pinholes_per_client_and_in_total():
    alg, nat, holes = make(max_pinholes_per_client=2, max_pinholes=3)
    outs = []
    for i in range(3):
        conn = Conn(alg, nat, client=("10.0.0.2", 20000 + i))
        login(conn)
        outs.append(conn.c(b"PORT 10,0,0,2,195,%d\r\n" % (80 + i)).payload)
    assert [o.startswith(b"PORT 203,0,113,1") for o in outs] == [True, True, False]
    assert alg.counters["client_pinhole_cap"] == 1
    other = Conn(alg, nat, client=("10.0.0.3", 20000))
    login(other)
    assert other.c(b"PORT 10,0,0,3,195,90\r\n").payload == b"PORT 203,0,113,1,195,90\r\n"  # its own budget
    # the total is reached: a client holding none takes the oldest of the one holding most
    last = Conn(alg, nat, client=("10.0.0.4", 20000))
    login(last)
    assert last.c(b"PORT 10,0,0,4,195,100\r\n").payload == b"PORT 203,0,113,1,195,100\r\n"
    assert alg.counters["pinholes_preempted"] == 1 and len(holes.live) == 3
    assert alg.per_client == {"10.0.0.2": 1, "10.0.0.3": 1, "10.0.0.4": 1}
    alg.tick(1e9)  # every pinhole expires: the budgets are free again
    assert not holes.live and not alg.per_client


def test_total_pinhole_cap_between_equals_opens_nothing():
    alg, nat, holes = make(max_pinholes_per_client=1, max_pinholes=2)
    for i, client in enumerate(("10.0.0.2", "10.0.0.3", "10.0.0.4")):
        conn = Conn(alg, nat, client=(client, 20000))
        login(conn)
        line = b"PORT %s,195,%d\r\n" % (client.replace(".", ",").encode(), 80 + i)
        out = conn.c(line).payload
        assert (out == line) == (i == 2)  # the third opens nothing: no one holds more than it would
    assert alg.counters["pinhole_cap"] == 1 and len(holes.live) == 2


def test_a_reused_tuple_whose_syn_was_not_seen_is_a_new_connection():
    alg, nat, holes = make()
    old = Conn(alg, nat, client=("10.0.0.2", 20000))
    login(old)
    old.c(PORT)  # corrected: kept after its close for late retransmissions
    old.c(b"QUIT\r\n", "FA")
    old.s(b"221 bye\r\n", "FA")
    assert alg.tracked == 1
    new = Conn(alg, nat, client=("10.0.0.2", 20000), cisn=900_000, sisn=700_000, handshake=False)
    new.s_rcv, new.c_rcv = new.cseq, new.sseq  # its handshake went by (the queue was full)
    assert new.c(b"PORT 10,0,0,2,195,81\r\n").payload == b"PORT 203,0,113,1,195,81\r\n"
    assert alg.counters["flows_reused"] == 1


def test_held_bytes_cap_lets_partial_lines_go_unchanged():
    alg, nat, holes = make(max_held_bytes=16)
    conn = Conn(alg, nat)
    login(conn)
    assert conn.c(b"PORT 10,0,0,2,") is None and conn.held_last  # 14 bytes held
    other = Conn(alg, nat, client=("10.0.0.2", 20001))
    login(other)
    seg = other.c(b"PORT 10,0,0,2,1")  # would exceed the cap: goes on unchanged
    assert seg is not None and seg.payload == b"PORT 10,0,0,2,1"
    assert alg.counters["held_cap"] == 1


def test_auth_tls_makes_the_session_opaque_and_keeps_corrections():
    alg, nat, holes = make()
    conn = Conn(alg, nat)
    login(conn)
    conn.c(PORT)  # rewritten: the kernel now corrects this connection
    conn.s(b"200 ok\r\n")
    conn.c(b"AUTH TLS\r\n")
    conn.s(b"234 Proceed with negotiation.\r\n")
    assert alg.counters["encrypted"] == 1 and not holes.live  # the live pinhole closed
    # TLS records that happen to hold a line which looks like PORT: read as nothing
    blob = b"\x16\x03\x01\x00\x10\r\nPORT 10,0,0,2,195,81\r\n"
    assert conn.c(blob).payload == blob
    assert conn.s(b"\x17\x03\x03\r\n227 Entering Passive Mode (10,0,0,9,195,80)\r\n").payload.startswith(b"\x17")
    assert not holes.live and alg.counters["rewrites"] == 1


def test_auth_refused_keeps_the_session_in_clear():
    alg, nat, holes = make()
    conn = Conn(alg, nat)
    login(conn)
    conn.c(b"AUTH TLS\r\n")
    conn.s(b"502 not implemented\r\n")
    assert conn.c(PORT).payload == PORT_OUT and alg.counters["encrypted"] == 0


def test_tls_stays_tls_after_a_gap_and_is_recognised_mid_stream():
    alg, nat, holes = make()
    conn = Conn(alg, nat)
    login(conn)
    conn.c(b"AUTH TLS\r\n")
    conn.s(b"234 go\r\n")
    record = b"\x17\x03\x03\x00\x20" + b"x" * 10 + b"\nP"
    conn.c(record, seq=(conn.cseq + 100) & 0xFFFFFFFF)  # a hole before it: lost upstream
    assert alg.counters["gap_encrypted"] == 1 and alg.counters["gap"] == 0
    assert not conn.held_last  # no line start is read into it, nothing held
    # a process that starts now meets the connection mid-stream, in TLS
    fresh = Driven(nat)
    conn.alg = fresh
    seg = conn.c(record)
    assert seg.payload == record and fresh.counters["encrypted"] == 1
    assert conn.c(b"\x17\x03\x03\x00\x20\r\nPORT 10,0,0,2,195,80\r\n").payload.endswith(PORT)
    assert not holes.live
