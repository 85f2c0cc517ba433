import random

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP

from alg_helpers import MASK, Conn, Driven, FakeKernel, as_bytes, packed
from ftpalg.core import packet
from ftpalg.core.direction import HOLD_SEGMENTS
from ftpalg.core.events import HELD, PASS, Drop, DropWhy, Replace
from ftpalg.core.seqadj import KernelAdj

PORT = b"PORT 10,0,0,2,195,80\r\n"  # 10.0.0.2:50000
PORT_OUT = b"PORT 203,0,113,1,195,80\r\n"


@pytest.fixture
def env():
    nat = holes = FakeKernel()
    return Driven(nat, pinhole_timeout=120.0), nat, holes


def login(conn):
    conn.s(b"220 hello\r\n")
    conn.c(b"USER anonymous\r\n")
    conn.s(b"331 ok\r\n")


def test_port_is_rewritten_and_pinhole_opened(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    seg = conn.c(PORT)
    assert seg.payload == PORT_OUT
    (ph,) = holes.live.values()
    assert (ph.peer, ph.public, ph.public_port, ph.inside, ph.inside_port) == (
        "203.0.113.2", "203.0.113.1", 50000, "10.0.0.2", 50000)


def test_seq_and_ack_shift_for_the_rest_of_the_connection(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    before = conn.cseq
    seg = conn.c(PORT)
    assert seg.seq == before  # the rewritten segment keeps its seq
    grow = len(PORT_OUT) - len(PORT)
    ack = conn.s(b"200 ok\r\n")  # the server acks the longer line ...
    assert ack.ack == (before + len(PORT)) & MASK  # ... the client sees its own numbering
    seg = conn.c(b"RETR f\r\n")
    assert seg.seq == (before + len(PORT) + grow) & MASK
    for _ in range(3):  # and it goes on
        conn.s(b"150 go\r\n")
        seg = conn.c(b"NOOP\r\n")
        assert seg.seq == (conn.cseq - 6 + grow) & MASK


def test_shrinking_rewrite():
    nat = FakeKernel()
    alg = Driven(nat)
    conn = Conn(alg, nat, client=("192.168.100.200", 40000), public=("1.2.3.4", 61000))
    login(conn)
    line = b"PORT 192,168,100,200,195,80\r\n"
    start = conn.cseq
    seg = conn.c(line)
    assert seg.payload == b"PORT 1,2,3,4,195,80\r\n"
    ack = conn.s(b"200 ok\r\n")
    assert ack.ack == (start + len(line)) & MASK
    assert conn.c(b"NOOP\r\n").seq == (start + len(line) - 8) & MASK
    # the kernel carries the correction: one point, 8 bytes shorter after it
    (orig, reply) = nat.adj[(packed("192.168.100.200"), 40000, packed("203.0.113.2"), 21)]
    assert (orig.pos, orig.before, orig.after) == (start, 0, -8) and not reply.active


def test_retransmission_is_byte_identical_and_opens_nothing_new(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    start = conn.cseq
    conn.c(PORT)
    first = conn.last_raw
    conn.c(PORT, seq=start)
    assert conn.last_raw == first
    assert holes.log == [("open", 1)]


def test_retransmission_that_coalesces_two_segments(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    start = conn.cseq
    conn.c(PORT)
    conn.c(b"RETR f\r\n")
    seg = conn.c(PORT + b"RETR f\r\n", seq=start)
    assert seg.payload == PORT_OUT + b"RETR f\r\n" and seg.seq == start


def test_retransmission_starting_inside_rewritten_line_is_dropped(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    start = conn.cseq
    conn.c(PORT)
    assert conn.c(PORT[5:], seq=start + 5) is None
    assert alg.counters["dropped_unreplayable"] == 1


def test_several_commands_in_one_segment(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    seg = conn.c(b"TYPE I\r\n" + PORT + b"RETR f\r\n")
    assert seg.payload == b"TYPE I\r\n" + PORT_OUT + b"RETR f\r\n"


def test_eprt_any_delimiter(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    assert conn.c(b"eprt !1!10.0.0.2!50000!\r\n").payload == b"eprt !1!203.0.113.1!50000!\r\n"


def test_bounce_is_refused(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    line = b"PORT 198,51,100,7,0,25\r\n"
    assert conn.c(line).payload == line
    assert not holes.log and alg.counters["refused"] == 1


def test_malformed_passes_unchanged(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    line = b"PORT 10,0,0,2,999,1\r\n"
    assert conn.c(line).payload == line
    assert not holes.log and alg.counters["malformed"] == 1


def test_port_split_across_two_segments_is_rewritten(env):
    """The first segment waits (HELD) for the rest; then both go, the first with its part
    of the rewritten line in its own length, the second with the rest and the growth."""
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    start = conn.cseq
    assert conn.c(PORT[:10]) is None  # held
    second = conn.c(PORT[10:])
    ((_, first),) = conn.released
    assert (first.seq, first.payload) == (start, PORT_OUT[:10])
    assert (second.seq, second.payload) == (start + 10, PORT_OUT[10:])
    assert len(holes.live) == 1 and alg.counters["lines_assembled"] == 1
    grow = len(PORT_OUT) - len(PORT)
    assert conn.c(b"RETR f\r\n").seq == (start + len(PORT) + grow) & MASK
    # retransmissions of either part come out as they went the first time
    conn.c(PORT[:10], seq=start)
    assert conn.last_raw and packet_payload(conn.last_raw) == PORT_OUT[:10]
    conn.c(PORT[10:], seq=start + 10)
    assert packet_payload(conn.last_raw) == PORT_OUT[10:]
    conn.c(PORT, seq=start)  # or both joined (TCP coalesces retransmissions)
    assert packet_payload(conn.last_raw) == PORT_OUT and holes.log == [("open", 1)]


def packet_payload(raw: bytes) -> bytes:
    from ftpalg.core import packet

    return packet.decode(raw).payload


def test_line_split_over_three_segments_after_a_whole_one(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    assert conn.c(b"TYPE I\r\nPO") is None  # a whole line, then the start of a PORT
    assert conn.c(b"RT 10,0,0,") is None
    last = conn.c(b"2,195,80\r\nNOOP\r\n")
    (_, a), (_, b) = conn.released
    assert a.payload == b"TYPE I\r\nPO" and b.payload == b"RT 203,0,1"  # each keeps its length
    assert b"TYPE I\r\n" + a.payload[8:] + b.payload + last.payload == b"TYPE I\r\n" + PORT_OUT + b"NOOP\r\n"
    assert len(holes.live) == 1


def test_227_split_by_the_server_is_rewritten(env):
    alg, nat, holes = env
    conn = dnat_conn(alg, nat)
    login(conn)
    conn.s(b"230 in\r\n")
    conn.c(b"PASV\r\n")
    reply = b"227 Entering Passive Mode (10,1,0,2,195,149).\r\n"
    assert conn.s(reply[:30]) is None
    rest = conn.s(reply[30:])
    ((_, first),) = conn.released
    assert first.payload + rest.payload == b"227 Entering Passive Mode (198,51,100,2,195,149).\r\n"
    assert len(first.payload) == 30 and len(holes.live) == 1


def test_a_partial_line_that_cannot_carry_an_address_is_not_held(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    assert conn.c(b"RETR fi").payload == b"RETR fi"
    assert conn.c(b"le\r\n").payload == b"le\r\n"
    assert alg.counters["lines_assembled"] == 0


def test_held_segment_whose_rest_never_comes_is_dropped_once_then_let_go(env):
    """A sender that waits for the first part's ACK before sending the rest (Nagle) never
    sends the rest while the first part is held: it is dropped once, TCP resends it joined
    with the rest, and that is rewritten; a partial line that stays partial goes unchanged
    the second time."""
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    start = conn.cseq
    assert conn.c(PORT[:10]) is None
    alg.expire_held(conn.now + 1)
    assert alg.take_released() == [((start, PORT[:10]), Drop(DropWhy.REWOUND))] and alg.counters["held_dropped"] == 1
    conn.cseq = start
    assert conn.c(PORT).payload == PORT_OUT  # the retransmission, coalesced
    conn.s(b"200 ok\r\n")
    start = conn.cseq
    assert conn.c(b"PORT 10,0") is None
    alg.expire_held(conn.now + 1)
    alg.take_released()
    conn.cseq = start
    assert conn.c(b"PORT 10,0") is None
    alg.expire_held(conn.now + 1)  # the same line again: let go unchanged
    assert alg.take_released() == [((start, b"PORT 10,0"), PASS)]
    assert alg.counters["partial_line"] == 1


def test_copy_of_a_held_segment_is_dropped_and_out_of_order_data_releases_it(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    start = conn.cseq
    assert conn.c(PORT[:10]) is None
    assert conn.c(PORT[:10], seq=start) is None and alg.counters["held_duplicate"] == 1
    assert conn.c(b"junk", seq=start + 20) is None  # ahead of the stream: kept for the hole
    alg.expire_held(conn.now + 10)  # the hole never fills: the held line goes as it was, then the rest
    assert alg.take_released() == [((start, PORT[:10]), PASS), ((start + 20, b"junk"), PASS)]
    assert alg.counters["partial_line"] == 1 and alg.counters["gap"] == 1


def test_not_at_line_start_is_ignored(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    conn.c(b"SITE x ")
    assert conn.c(PORT).payload == PORT
    assert not holes.log


def test_busy_port_is_replaced_by_a_random_higher_one():
    nat = holes = FakeKernel()
    alg = Driven(nat, rng=random.Random(7))
    a = Conn(alg, nat)
    b = Conn(alg, nat, client=("10.0.0.3", 40000), public=("203.0.113.1", 61001))
    login(a)
    login(b)
    assert a.c(PORT).payload == PORT_OUT
    out = b.c(b"PORT 10,0,0,3,195,80\r\n").payload
    ph = next(p for p in holes.live.values() if p.inside == "10.0.0.3")
    assert 50000 < ph.public_port <= 65535 and ph.inside_port == 50000
    assert out == f"PORT 203,0,113,1,{ph.public_port >> 8},{ph.public_port & 255}\r\n".encode()


def test_no_free_port_passes_unchanged():
    nat = holes = FakeKernel()
    alg = Driven(nat)
    a = Conn(alg, nat)
    b = Conn(alg, nat, client=("10.0.0.3", 40000), public=("203.0.113.1", 61001))
    login(a)
    login(b)
    a.c(b"PORT 10,0,0,2,255,255\r\n")  # 65535: the only candidate for another 65535
    line = b"PORT 10,0,0,3,255,255\r\n"
    assert b.c(line).payload == line
    assert alg.counters["no_free_port"] == 1 and len(holes.live) == 1


def test_pinhole_closes_after_transfer(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    conn.c(PORT)
    conn.s(b"200 PORT ok\r\n")
    conn.c(b"RETR f\r\n")
    conn.s(b"150 here it comes\r\n")
    assert holes.live
    conn.s(b"226-done\r\n226 really done\r\n")
    assert not holes.live and holes.log == [("open", 1), ("close", 1)]


def test_pinhole_closes_when_server_refuses(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    conn.c(PORT)
    conn.s(b"500 Illegal PORT command.\r\n")
    assert not holes.live


def test_multiline_reply_does_not_close_early(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    conn.c(PORT)
    conn.s(b"200-ok\r\n226 not the end\r\n")  # inside a 200- reply: not a final reply
    conn.c(b"RETR f\r\n")
    conn.s(b"200 end\r\n")  # now the PORT reply ends
    assert holes.live
    conn.s(b"226 done\r\n")
    assert not holes.live


def test_new_port_replaces_old_pinhole(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    conn.c(PORT)
    conn.s(b"200 ok\r\n")
    conn.c(b"PORT 10,0,0,2,195,90\r\n")
    assert [p.inside_port for p in holes.live.values()] == [50010]
    assert holes.log == [("open", 1), ("close", 1), ("open", 2)]


def test_pinhole_times_out(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    conn.c(PORT)
    alg.tick(100.0)
    assert holes.live
    alg.tick(120.0)
    assert not holes.live


@pytest.mark.parametrize("flags", ["FA", "RA"])
def test_pinhole_closes_with_control_connection(env, flags):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    conn.c(PORT)
    conn.c(b"", flags)
    assert not holes.live
    if flags == "FA":
        conn.s(b"", "FA")
    alg.tick(1000.0)
    assert not alg.flows  # finished connections are forgotten after a grace period


def test_backend_failure_passes_unchanged(env):
    alg, nat, holes = env
    holes.fail_expect = True
    conn = Conn(alg, nat)
    login(conn)
    assert conn.c(PORT).payload == PORT
    assert alg.counters["pinhole_failed"] == 1
    assert conn.s(b"500 no\r\n").ack == conn.cseq  # nothing to correct


def test_no_nat_mapping_passes_unchanged(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    nat.table.clear()
    alg.flows.clear()
    assert conn.c(PORT).payload == PORT
    assert alg.counters["no_nat_mapping"] == 1


def test_sequence_wraparound(env):
    alg, nat, holes = env
    conn = Conn(alg, nat, cisn=MASK - 30)
    login(conn)  # "USER anonymous\r\n" crosses 2**32
    start = conn.cseq
    seg = conn.c(PORT)
    assert seg.payload == PORT_OUT
    ack = conn.s(b"200 ok\r\n")
    assert ack.ack == (start + len(PORT)) & MASK
    assert conn.c(b"NOOP\r\n").seq == (start + len(PORT) + 3) & MASK


def test_sack_blocks_mapped_back(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    start = conn.cseq
    conn.c(PORT)
    conn.c(b"NOOP\r\n")
    wire = (start + len(PORT_OUT)) & MASK
    seg = conn.s(b"", "A", options=[("NOP", None), ("NOP", None), ("SAck", (wire, wire + 6))])
    assert seg.sack_blocks() == [((start + len(PORT)) & MASK, (start + len(PORT) + 6) & MASK)]


def test_mid_session_start(env):
    alg, nat, holes = env
    conn = Conn(alg, nat, handshake=False)
    assert conn.c(PORT).payload == PORT_OUT


def test_reused_tuple_starts_fresh(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    conn.c(PORT)
    conn2 = Conn(alg, nat, cisn=777777)
    assert not holes.live and alg.counters["flows_reused"] == 1
    login(conn2)
    assert conn2.c(b"NOOP\r\n").seq == conn2.cseq - 6


def test_retransmitted_syn_keeps_the_flow(env):
    alg, nat, holes = env
    conn = Conn(alg, nat, handshake=False)
    isn = conn.cseq
    conn.c(b"", "S")
    conn.c(b"", "S", seq=isn)
    conn.s(b"", "SA")
    conn.c(b"", "A")
    login(conn)
    conn.c(PORT)
    assert len(holes.live) == 1 and alg.counters["flows_reused"] == 0


def test_truncated_copy_passes_unless_the_flow_has_corrections(env):
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    conn.c(b"NOOP\r\n")
    # the same packet cut short, as netfilterqueue hands over a copy larger than its buffer
    assert alg.handle(conn.last_in[:-3], 0.0) is PASS and alg.counters["truncated"] == 1
    conn.c(PORT)  # from now on the stream is corrected
    conn.c(b"NOOP\r\n")
    assert alg.handle(conn.last_in[:-3], 0.0) == Drop(DropWhy.TRUNCATED)
    assert alg.counters["dropped_truncated"] == 1


def test_server_side_packets_of_unknown_flows_pass():
    alg = Driven(FakeKernel())
    raw = bytes(IP(src="203.0.113.2", dst="203.0.113.1") / TCP(sport=21, dport=5000, flags="PA") / b"227 x\r\n")
    assert alg.handle(raw, 0.0) is PASS


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=120))
def test_garbage_packets_never_raise(env, data):
    alg, nat, holes = env
    out = alg.handle(data, 0.0)
    assert out is PASS or isinstance(out, (Replace, Drop))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=60), max_size=6))
def test_hostile_payloads_never_raise(chunks):
    nat = holes = FakeKernel()
    alg = Driven(nat)
    conn = Conn(alg, nat)
    held = 0
    for i, chunk in enumerate(chunks):
        if i % 2:
            conn.c(b"PORT " + chunk)
        else:
            conn.s(chunk)
        held += conn.held_last
        held -= len(conn.released)
    alg.expire_held(conn.now + 10)
    assert len(alg.take_released()) == held  # nothing stays held
    assert len(holes.live) <= 1


def test_idle_flows_are_forgotten_only_when_safe(env):
    alg, nat, holes = env
    plain = Conn(alg, nat, client=("10.0.0.3", 40001))
    login(plain)
    fixed = Conn(alg, nat)
    login(fixed)
    fixed.c(PORT)  # now carries a seq correction
    alg.tick(700.0)
    assert fixed.last_raw and len({id(f) for f, _ in alg.flows.values()}) == 1  # the corrected one stays
    alg.tick(1400.0)
    assert alg.flows  # conntrack still knows it: keep its corrections
    nat.table.clear()
    alg.tick(2100.0)
    assert not alg.flows and not holes.live


# ---- servers behind NAT, passive mode, IPv6 (issue 5) -------------------------------------
OUTSIDE = ("203.0.113.100", 40000)
PUBLIC = ("198.51.100.2", 21)
INSIDE = ("10.1.0.2", 21)


def dnat_conn(alg, nat, **kw):
    """An outside client talking to a server behind DNAT (no SNAT: the server sees the client)."""
    kw.setdefault("client", OUTSIDE)
    kw.setdefault("public", kw["client"])
    return Conn(alg, nat, server=kw.pop("server", INSIDE), dest=kw.pop("dest", PUBLIC), **kw)


def passive(conn, reply, cmd=b"PASV\r\n"):
    login(conn)
    conn.s(b"230 in\r\n")
    conn.c(cmd)
    return conn.s(reply)


def pinholes(holes):
    return [(p.peer, p.public, p.public_port, p.inside, p.inside_port, p.snat) for p in holes.live.values()]


def test_227_from_a_server_behind_dnat_is_rewritten_to_the_public_address(env):
    alg, nat, holes = env
    conn = dnat_conn(alg, nat)
    seg = passive(conn, b"227 Entering Passive Mode (10,1,0,2,195,149).\r\n")
    assert seg.payload == b"227 Entering Passive Mode (198,51,100,2,195,149).\r\n"
    assert pinholes(holes) == [("203.0.113.100", "198.51.100.2", 50069, "10.1.0.2", 50069, None)]
    grow = len(b"198,51,100,2") - len(b"10,1,0,2")
    # the client acks the longer reply: the server sees its own numbering ...
    ack = conn.c(b"RETR f\r\n")
    assert ack.ack == conn.sseq
    # ... and the server's next segment is shifted for the client
    seg = conn.s(b"150 ok\r\n")
    assert seg.seq == (conn.sseq - 8 + grow) & MASK and seg.seq != conn.sseq - 8
    conn.s(b"226 done\r\n")
    assert holes.live == {} and holes.log[-1] == ("close", 1)


def test_227_already_naming_the_public_address_opens_without_rewrite(env):
    alg, nat, holes = env
    conn = dnat_conn(alg, nat)
    line = b"227 =198,51,100,2,117,48\r\n"
    seg = passive(conn, line)
    assert seg.payload == line and alg.counters["rewrites"] == 0
    assert pinholes(holes) == [("203.0.113.100", "198.51.100.2", 30000, "10.1.0.2", 30000, None)]


def test_229_opens_the_port_and_rewrites_only_a_busy_one(env):
    alg, nat, holes = env
    line = b"229 Entering Extended Passive Mode (|||30000|)\r\n"
    first = dnat_conn(alg, nat)
    assert passive(first, line, b"EPSV\r\n").payload == line
    second = dnat_conn(alg, nat, client=("203.0.113.100", 40001))  # same client, same port announced
    seg = passive(second, line, b"EPSV\r\n")
    port = int(seg.payload.split(b"|||")[1].split(b"|")[0])
    assert 30000 < port <= 65535 and seg.payload.endswith(b"|)\r\n")
    assert sorted(p[2] for p in pinholes(holes)) == [30000, port]
    assert all(p[3:5] == ("10.1.0.2", 30000) for p in pinholes(holes))


def test_228_and_lprt(env):
    alg, nat, holes = env
    conn = dnat_conn(alg, nat)
    seg = passive(conn, b"228 Entering Long Passive Mode (4,4,10,1,0,2,2,117,48)\r\n", b"LPSV\r\n")
    assert seg.payload == b"228 Entering Long Passive Mode (4,4,198,51,100,2,2,117,48)\r\n"
    conn = Conn(alg, nat, client=("10.0.0.2", 40002))
    login(conn)
    assert conn.c(b"LPRT 4,4,10,0,0,2,2,117,48\r\n").payload == b"LPRT 4,4,203,0,113,1,2,117,48\r\n"
    assert ("203.0.113.2", "203.0.113.1", 30000, "10.0.0.2", 30000, None) in pinholes(holes)


@pytest.mark.parametrize("reply", [b"227 Entering Passive Mode (10,1,0,2,117,48)\r\n",
                                   b"229 Entering Extended Passive Mode (|||30000|)\r\n"])
def test_passive_reply_only_counts_as_the_answer_to_pasv(env, reply):
    alg, nat, holes = env
    conn = dnat_conn(alg, nat)
    login(conn)
    conn.s(b"230 in\r\n")
    conn.c(b"NOOP\r\n")
    assert conn.s(reply).payload == reply  # unsolicited: unchanged, nothing opened
    assert holes.live == {} and alg.counters["unsolicited"] == 1
    assert conn.c(b"PASV\r\n" if reply.startswith(b"227") else b"EPSV\r\n").payload  # a real one works
    conn.s(reply)
    assert len(holes.live) == 1


def test_227_naming_a_third_address_is_refused(env):
    alg, nat, holes = env
    conn = dnat_conn(alg, nat)
    line = b"227 Entering Passive Mode (192,0,2,99,117,48)\r\n"
    assert passive(conn, line).payload == line
    assert holes.live == {} and alg.counters["refused"] == 1


def test_active_mode_towards_an_inside_server_snats_the_data_connection(env):
    alg, nat, holes = env
    conn = dnat_conn(alg, nat)
    login(conn)
    line = b"PORT 203,0,113,100,117,48\r\n"
    assert conn.c(line).payload == line  # the client's own public address: nothing to rewrite
    assert pinholes(holes) == [("10.1.0.2", "203.0.113.100", 30000, "203.0.113.100", 30000, "198.51.100.2")]


def test_one_gateway_dnats_the_server_and_snats_the_client(env):
    alg, nat, holes = env
    conn = dnat_conn(alg, nat, dest=("198.51.100.6", 21), public=("10.1.0.1", 61000))
    seg = passive(conn, b"227 Entering Passive Mode (10,1,0,2,117,48)\r\n")
    assert seg.payload == b"227 Entering Passive Mode (198,51,100,6,117,48)\r\n"
    assert pinholes(holes) == [("203.0.113.100", "198.51.100.6", 30000, "10.1.0.2", 30000, "10.1.0.1")]
    conn.c(b"RETR f\r\n")
    conn.s(b"226 ok\r\n")
    seg = conn.c(b"EPRT |1|203.0.113.100|30001|\r\n")
    assert seg.payload == b"EPRT |1|10.1.0.1|30001|\r\n"
    assert pinholes(holes) == [("10.1.0.2", "10.1.0.1", 30001, "203.0.113.100", 30001, "198.51.100.6")]


def test_ipv6_without_nat_opens_pinholes_without_rewriting(env):
    alg, nat, holes = env
    client, server = ("2001:db8:1::100", 40000), ("2001:db8:3::2", 21)
    conn = Conn(alg, nat, client=client, server=server, public=client)
    line = b"229 Entering Extended Passive Mode (|||30000|)\r\n"
    assert passive(conn, line, b"EPSV\r\n").payload == line
    assert pinholes(holes) == [("2001:db8:1::100", "2001:db8:3::2", 30000, "2001:db8:3::2", 30000, None)]
    conn.c(b"LIST\r\n")
    conn.s(b"226 ok\r\n")
    line = b"EPRT |2|2001:db8:1::100|30001|\r\n"
    assert conn.c(line).payload == line
    assert pinholes(holes) == [("2001:db8:3::2", "2001:db8:1::100", 30001, "2001:db8:1::100", 30001, None)]
    assert alg.counters["rewrites"] == 0


def test_nat66_rewrites_eprt(env):
    alg, nat, holes = env
    conn = Conn(alg, nat, client=("fd00:1::2", 40000), server=("2001:db8:1::2", 21),
                public=("2001:db8:1::1", 61000))
    login(conn)
    seg = conn.c(b"EPRT |2|fd00:1::2|30000|\r\n")
    assert seg.payload == b"EPRT |2|2001:db8:1::1|30000|\r\n"
    assert pinholes(holes) == [("2001:db8:1::2", "2001:db8:1::1", 30000, "fd00:1::2", 30000, None)]
    ack = conn.s(b"200 ok\r\n")
    assert ack.ack == conn.cseq  # the client's own numbering, over IPv6 too
    assert conn.c(b"EPRT |1|10.0.0.2|30000|\r\n").payload == b"EPRT |1|10.0.0.2|30000|\r\n"  # wrong family
    assert alg.counters["refused"] == 1


def test_no_rewrite_where_the_kernel_cannot_adjust_sequence_numbers(env):
    """A connection that began before ftpalg's helper was attached has no seqadj extension:
    a length-changing rewrite would desynchronise it, so the line passes unchanged."""
    alg, nat, holes = env
    nat.fail_adjust = True
    conn = Conn(alg, nat)
    login(conn)
    assert conn.c(PORT).payload == PORT
    assert alg.counters["no_seq_adjust"] == 1 and holes.live == {} and holes.log == [("open", 1), ("close", 1)]


def test_retransmission_across_two_rewrites_lands_where_it_belongs(env):
    """Two PORTs in flight, the first lost: the kernel keeps one correction point and would
    shift the first one's retransmission by the second's 'before' offset; the core corrects
    the seq it hands over, so the server gets the bytes at the right place."""
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    start = conn.cseq
    first = conn.c(PORT)
    assert first.seq == start
    second = conn.c(b"PORT 10,0,0,2,195,81\r\n")
    grow = len(PORT_OUT) - len(PORT)
    assert second.seq == (start + len(PORT) + grow) & MASK
    again = conn.c(PORT, seq=start)  # the first, retransmitted
    assert (again.seq, again.payload) == (first.seq, first.payload)
    assert alg.counters["seq_compensated"] == 1


def test_history_is_dropped_when_the_connection_went_by_elsewhere(env):
    """Fail-back in a gateway pair: this process rewrote a PORT, then the other gateway
    carried the session and rewrote one more (the synced kernel correction grew), now the
    session is back. The gap in the stream tells the core its history is stale: it starts
    over from the kernel's correction, and the next PORT lands where the server expects it."""
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    conn.c(PORT)
    grow = len(PORT_OUT) - len(PORT)
    conn.s(b"200 ok\r\n")
    # the other gateway: a PORT it rewrote (same growth), the server's reply
    elsewhere = b"PORT 10,0,0,2,195,81\r\n"
    nat.seq_adjust(conn.key, 0, conn.cseq, grow, None)
    conn.cseq = (conn.cseq + len(elsewhere)) & MASK
    conn.s_rcv = (conn.s_rcv + len(elsewhere) + grow) & MASK
    conn.sseq = (conn.sseq + 8) & MASK
    conn.c_rcv = (conn.c_rcv + 8) & MASK
    assert conn.c(b"TYPE I\r\n") is None  # back here: ahead of what we saw, kept for a while ...
    alg.expire_held(conn.now + 10)  # ... the hole does not fill: a gap
    ((token, out),) = alg.take_released()
    seg = packet.decode(nat.kernel(as_bytes(out) or conn.sent[token], conn.key, 0))
    assert alg.counters["resync"] >= 1 and alg.counters["gap"] == 1
    assert seg.seq == (conn.cseq - 8 + 2 * grow) & MASK  # the kernel's two corrections
    conn.s(b"200 ok\r\n")
    reads = nat.reads
    seg = conn.c(PORT)
    assert seg.payload == PORT_OUT and seg.seq == (conn.cseq - len(PORT) + 2 * grow) & MASK
    assert alg.counters["seq_compensated"] == 0
    assert nat.reads == reads + 1  # what it knew is stale: the kernel's correction is read again


def test_corrections_this_process_knows_are_not_read_again(env):
    """The look-up of the NAT mapping tells that the kernel holds no correction yet; from
    then on this process makes every correction itself and knows the kernel's state, so none
    is read before it is updated (one netlink round trip less per rewrite), and the kernel
    ends where reading would have put it."""
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    grow = len(PORT_OUT) - len(PORT)
    for i in range(3):
        seg = conn.c(PORT)
        assert seg.payload == PORT_OUT and seg.seq == (conn.cseq - len(PORT) + i * grow) & MASK
        conn.s(b"200 ok\r\n")
        conn.c(b"RETR f\r\n")
        conn.s(b"150 go\r\n226 done\r\n")
    assert nat.reads == 0 and alg.counters["seqadj_reads_skipped"] == 3
    assert nat.adj[conn.key][0].after == 3 * grow
    assert alg.counters["pinhole_close_unacked"] == 3 and not holes.live


def test_a_connection_the_kernel_corrected_before_is_read_once_before_its_first_rewrite():
    """Met mid-stream with corrections already in the kernel (an earlier run, the other
    gateway of a pair): the first rewrite reads the kernel's state; later ones need not."""
    nat = FakeKernel()
    alg = Driven(nat)
    conn = Conn(alg, nat, handshake=False)
    nat.adj[conn.key] = [KernelAdj(), KernelAdj()]
    login(conn)
    for _ in range(2):
        assert conn.c(PORT).payload == PORT_OUT
        conn.s(b"200 ok\r\n")
    assert nat.reads == 1 and alg.counters["seqadj_reads_skipped"] == 1


def test_segments_arriving_out_of_order_are_put_back_in_order_and_inspected(env):
    """The second part of a command arrives before the first: it waits until the hole fills,
    then both are inspected in stream order and leave in that order."""
    alg, nat, holes = env
    conn = Conn(alg, nat)
    login(conn)
    start = conn.cseq
    line = b"NOOP\r\n" + PORT
    assert conn.c(line[6:], seq=start + 6) is None  # the PORT, ahead of the NOOP
    first = conn.c(line[:6], seq=start)
    assert first is None  # its verdict goes with the one that waited
    (a_tok, a), (b_tok, b) = conn.released
    assert (a_tok, b_tok) == ((start, line[:6]), (start + 6, line[6:]))  # stream order
    assert a.payload == b"NOOP\r\n" and b.payload == PORT_OUT and len(holes.live) == 1
    assert alg.counters["reordered"] == 1 and alg.counters["gap"] == 0


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_segmentation_reordering_and_duplication_gives_the_rewritten_stream(data):
    """For a session's client byte stream cut into segments at random, delivered with random
    duplicates and local reordering (what TCP repairs), the server reassembles exactly the
    rewritten stream; every segment it gets carries the bytes it carried the first time."""
    nat = FakeKernel()
    alg = Driven(nat)
    conn = Conn(alg, nat)
    login(conn)
    cmds = [b"TYPE I\r\n", PORT, b"RETR f\r\n", b"EPRT |1|10.0.0.2|50001|\r\n", b"NOOP\r\n"]
    stream = b"".join(cmds)
    want = stream.replace(PORT, PORT_OUT).replace(b"|1|10.0.0.2|50001|", b"|1|203.0.113.1|50001|")
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=8)))
    bounds = list(zip([0, *cuts], [*cuts, len(stream)], strict=True))
    at = 0
    for c in cmds:  # a line over more than HOLD_SEGMENTS segments goes unchanged, by design
        assume(sum(1 for lo, hi in bounds if lo < at + len(c) and hi > at) <= HOLD_SEGMENTS)
        at += len(c)
    order = list(range(len(bounds)))
    for i in range(len(order) - 1):  # local swaps: reordering by at most a few segments
        if data.draw(st.booleans()):
            order[i], order[i + 1] = order[i + 1], order[i]
    sends = [i for i in order for _ in range(data.draw(st.integers(1, 2)))]  # some twice
    sends += list(range(len(bounds)))  # TCP repairs: the original segments resent in order
    start = conn.cseq
    got: dict[int, bytes] = {}
    out_seq0 = start
    for i in sends:
        lo, hi = bounds[i]
        seg = conn.c(stream[lo:hi], seq=(start + lo) & MASK)
        for pkt in [p for _, p in conn.released] + ([seg] if seg is not None else []):
            if pkt is not None and pkt.payload:
                off = (pkt.seq - out_seq0) & MASK
                assert got.setdefault(off, pkt.payload) == pkt.payload  # copies are identical
    alg.expire_held(conn.now + 10)
    for _, raw in alg.take_released():
        assert raw is None or raw  # nothing dropped at the end
    rebuilt = bytearray()
    for off in sorted(got):
        rebuilt[off : off + len(got[off])] = got[off]
    assert bytes(rebuilt) == want


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_server_replies_split_lost_duplicated_and_reordered_reassemble_and_acks_map_back(data):
    """The server's side behind DNAT: replies (a multi-line 227 among them) cut into segments
    at random, some lost and resent later (joined with their neighbour, as TCP's
    retransmission may coalesce), some doubled, some swapped. The client reassembles exactly
    the rewritten replies, and its ack of everything maps back to the server's own end."""
    nat = holes = FakeKernel()
    alg = Driven(nat)
    conn = dnat_conn(alg, nat)
    login(conn)
    conn.s(b"230 in\r\n")
    replies = [b"227-Entering Passive Mode\r\n", b" (10,1,0,2,195,149) here\r\n", b"227 ok\r\n"]
    conn.c(b"PASV\r\n")
    stream = b"".join(replies)
    want = stream.replace(b"10,1,0,2,195,149", b"198,51,100,2,195,149")
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=6)))
    bounds = list(zip([0, *cuts], [*cuts, len(stream)], strict=True))
    at = 0
    for r in replies:
        assume(sum(1 for lo, hi in bounds if lo < at + len(r) and hi > at) <= HOLD_SEGMENTS)
        at += len(r)
    plan = []  # (lo, hi) as sent: lost ones come again later, joined with the next
    lost = set()
    for i, (lo, hi) in enumerate(bounds):
        if data.draw(st.booleans()) and i + 1 < len(bounds):
            lost.add(i)
            continue
        if i - 1 in lost:
            plan.append((bounds[i - 1][0], hi))  # the resend, coalesced with this one
        plan.append((lo, hi))
        if data.draw(st.integers(0, 3)) == 0:
            plan.append((lo, hi))  # a copy
    for i in range(len(plan) - 1):
        if data.draw(st.integers(0, 3)) == 0:
            plan[i], plan[i + 1] = plan[i + 1], plan[i]
    start = conn.sseq
    got: dict[int, bytes] = {}
    out0 = None
    plan += bounds  # TCP repairs what is still missing: the original segments, resent in order
    for lo, hi in plan:
        raw = bytes(IP(src=INSIDE[0], dst=OUTSIDE[0]) / TCP(sport=21, dport=OUTSIDE[1], seq=(start + lo) & MASK,
                                                            ack=conn.s_rcv, flags="PA") / stream[lo:hi])
        out = as_bytes(alg.handle(raw, conn.now, token=(lo, hi)))
        done = [(t, as_bytes(o)) for t, o in alg.take_released()]
        if out is not HELD:
            done.append(((lo, hi), out))
        for (tlo, thi), o in done:
            if o == b"":
                continue
            pkt = packet.decode(nat.kernel(o or bytes(IP(src=INSIDE[0], dst=OUTSIDE[0]) / TCP(
                sport=21, dport=OUTSIDE[1], seq=(start + tlo) & MASK, ack=conn.s_rcv, flags="PA") / stream[tlo:thi]),
                conn.key, 1))
            out0 = start if out0 is None else out0
            off = (pkt.seq - start) & MASK
            for j in range(len(pkt.payload)):  # byte by byte: copies and joins must agree
                assert got.setdefault(off + j, pkt.payload[j : j + 1]) == pkt.payload[j : j + 1]
    alg.expire_held(conn.now + 10)
    alg.take_released()
    rebuilt = bytes(b"".join(got[i] for i in range(len(want)) if i in got))
    assert rebuilt == want and len(got) == len(want)
    assert len(holes.live) == 1
    # the client acks all it got: the server must see its own numbering
    ack = conn.c(b"", flags="A", seq=conn.cseq)
    del ack
    raw = bytes(IP(src=OUTSIDE[0], dst=PUBLIC[0]) / TCP(sport=OUTSIDE[1], dport=21, seq=conn.cseq,
                                                        ack=(start + len(want)) & MASK, flags="A"))
    seen = packet.decode(nat.kernel(as_bytes(alg.handle(raw, conn.now)) or raw, conn.key, 0))
    assert seen.ack == (start + len(stream)) & MASK
