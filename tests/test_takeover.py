"""A gateway taking over a connection whose line was already rewritten elsewhere: by the other
gateway of a failover pair (its kernel correction synced by conntrackd, its rewritten segment
lost on the way to the server), or by this gateway before a restart. The client retransmits
the line; the new ftpalg, which knows nothing of the connection, reads the kernel's
correction, finds this very line's correction there, rewrites the line identically and adds
nothing: the server gets the bytes it should and its acks map back to the client's numbering.
A second correction at the same point is still added when this process made the first one
itself (two announcements in one segment)."""

from alg_helpers import MASK, Conn, Driven, FakeKernel
from ftpalg.core.seqadj import KernelAdj

PORT = b"PORT 10,0,0,2,195,80\r\n"  # 10.0.0.2:50000
PORT_OUT = b"PORT 203,0,113,1,195,80\r\n"
GROW = len(PORT_OUT) - len(PORT)


def login(conn):
    conn.s(b"220 hello\r\n")
    conn.c(b"USER anonymous\r\n")
    conn.s(b"331 ok\r\n")


def take_over(conn: Conn) -> tuple[Driven, FakeKernel]:
    """The connection moves to a fresh ftpalg whose kernel holds what conntrackd synced: the
    NAT mapping and the sequence corrections (no expectations)."""
    old = conn.nat
    nat = FakeKernel()
    nat.table = dict(old.table)
    nat.adj = {k: list(v) for k, v in old.adj.items()}
    alg = Driven(nat, pinhole_timeout=120.0)
    conn.alg, conn.nat = alg, nat
    return alg, nat


def lost_on_the_way(conn: Conn, seg) -> None:
    """``seg`` (as it left the gateway) never reached the server."""
    conn.s_rcv = seg.seq


def test_a_line_the_other_gateway_rewrote_is_not_corrected_twice():
    first_nat = FakeKernel()
    conn = Conn(Driven(first_nat, pinhole_timeout=120.0), first_nat)
    login(conn)
    start = conn.cseq
    first = conn.c(PORT)  # rewritten by the failing gateway, correction synced ...
    assert first.payload == PORT_OUT and first_nat.adj[conn.key][0] == KernelAdj(start, 0, GROW)
    lost_on_the_way(conn, first)  # ... but lost with it

    alg, nat = take_over(conn)
    again = conn.c(PORT, seq=start)  # the client's retransmission reaches the standby
    assert (again.seq, again.payload) == (first.seq, first.payload)  # rewritten identically
    assert nat.adj[conn.key][0] == KernelAdj(start, 0, GROW)  # the synced correction, not doubled
    assert alg.counters["seqadj_already_corrected"] == 1 and nat.reads == 1
    (ph,) = nat.live.values()  # the pinhole is opened here
    assert ph.public_port == 50000
    conn.s_rcv = (again.seq + len(again.payload)) & MASK
    reply = conn.s(b"200 ok\r\n")  # the server acks the rewritten line ...
    assert reply.ack == conn.cseq == (start + len(PORT)) & MASK  # ... its whole original at the client

    # the session goes on through the new gateway: the next rewrite adds to the correction
    conn.c(b"RETR f\r\n")
    conn.s(b"150 go\r\n226 done\r\n")
    nxt = conn.cseq
    seg = conn.c(PORT)
    assert seg.payload == PORT_OUT and seg.seq == (nxt + GROW) & MASK
    assert nat.adj[conn.key][0] == KernelAdj(nxt, GROW, 2 * GROW)
    assert conn.s(b"200 ok\r\n").ack == conn.cseq
    assert alg.counters["seqadj_already_corrected"] == 1 and alg.counters["dropped_unreplayable"] == 0


def test_a_line_rewritten_before_a_restart_whose_first_copy_arrived_is_not_corrected_twice():
    """Restart: the rewritten line reached the server but its ack was not seen before the
    process died; the retransmission is rewritten alike, the server drops it as a copy, and
    its ack of the line maps back right."""
    nat = FakeKernel()
    conn = Conn(Driven(nat, pinhole_timeout=120.0), nat)
    login(conn)
    conn.c(b"TYPE I\r\n")
    conn.s(b"200 ok\r\n")
    start = conn.cseq
    first = conn.c(PORT)
    alg = Driven(nat, pinhole_timeout=120.0)  # the new process, same kernel
    nat.live.clear()  # its pinholes went with the old one's expectations (withdrawn at exit)
    conn.alg = alg
    again = conn.c(PORT, seq=start)
    assert again.payload == first.payload and again.seq == first.seq
    assert nat.adj[conn.key][0] == KernelAdj(start, 0, GROW)
    assert alg.counters["seqadj_already_corrected"] == 1
    assert conn.s(b"200 ok\r\n").ack == (start + len(PORT)) & MASK


def test_a_correction_of_another_size_at_that_point_is_added_to():
    """Only this line's own correction counts as made: a point at this seq that moved later
    bytes by something else is added to, as before."""
    nat = FakeKernel()
    conn = Conn(Driven(nat), nat)
    login(conn)
    start = conn.cseq
    nat.adj[conn.key] = [KernelAdj(start, 0, GROW + 1), KernelAdj()]
    alg, nat = take_over(conn)
    conn.c(PORT)
    assert nat.adj[conn.key][0] == KernelAdj(start, 0, 2 * GROW + 1)
    assert alg.counters["seqadj_already_corrected"] == 0


def test_two_announcements_in_one_segment_still_add_twice():
    """This process made the first correction at the point itself: the second line of the
    same segment adds to it (the state it knows is not read, nor taken as made already),
    also on a connection met with corrections made elsewhere before."""
    two = PORT + b"PORT 10,0,0,2,195,81\r\n"
    for earlier in (None, KernelAdj(500, 0, 7)):
        nat = FakeKernel()
        conn = Conn(Driven(nat), nat)
        login(conn)
        if earlier is not None:
            nat.adj[conn.key] = [earlier, KernelAdj()]
            alg, nat = take_over(conn)
        base = 0 if earlier is None else earlier.after
        start = conn.cseq
        seg = conn.c(two)
        assert seg.payload == PORT_OUT + b"PORT 203,0,113,1,195,81\r\n" and seg.seq == (start + base) & MASK
        assert nat.adj[conn.key][0] == KernelAdj(start, base, base + 2 * GROW)
        assert conn.alg.counters["seqadj_already_corrected"] == 0
        assert conn.s(b"200 ok\r\n200 ok\r\n").ack == conn.cseq


# ---- a passive command awaiting its reply across a restart -------------------------------------
OUTSIDE, INSIDE, PUBLIC = ("198.51.100.9", 40000), ("10.1.0.2", 21), ("198.51.100.2", 21)
REPLY_227 = b"227 Entering Passive Mode (10,1,0,2,195,149).\r\n"
PUBLIC_227 = b"227 Entering Passive Mode (198,51,100,2,195,149).\r\n"


def pasv_then_restart(hand_over: bool) -> tuple[Conn, FakeKernel]:
    """An outside client's PASV to a server behind DNAT, seen by one ftpalg, which then stops
    for a restart (handing over, or killed); the server's 227 reaches the next one."""
    nat = FakeKernel()
    conn = Conn(Driven(nat, pinhole_timeout=120.0, selected=True), nat, client=OUTSIDE, public=OUTSIDE,
                server=INSIDE, dest=PUBLIC)
    login(conn)
    conn.s(b"230 in\r\n")
    conn.c(b"PASV\r\n")
    if hand_over:
        conn.alg.hand_over()
    new = FakeKernel()
    new.table, new.adj, new.handed = dict(nat.table), nat.adj, dict(nat.handed)
    conn.alg, conn.nat = Driven(new, pinhole_timeout=120.0, selected=True), new
    return conn, new


def test_a_passive_reply_awaited_across_a_restart_is_taken_by_the_next_ftpalg():
    conn, nat = pasv_then_restart(hand_over=True)
    assert nat.handed == {conn.key: b"PASV"}
    seg = conn.s(REPLY_227)  # met first by the new process, from the server's side
    assert seg.payload == PUBLIC_227
    (ph,) = nat.live.values()
    assert (ph.peer, ph.public, ph.public_port, ph.inside) == ("198.51.100.9", "198.51.100.2", 50069, "10.1.0.2")
    assert nat.handed == {}  # taken: a second 227 is not solicited by it
    assert conn.s(REPLY_227).payload == REPLY_227 and conn.alg.counters["unsolicited"] == 1


def test_without_the_hand_over_the_reply_is_unsolicited_for_the_next_ftpalg():
    conn, nat = pasv_then_restart(hand_over=False)  # kill -9: nothing was handed over
    assert conn.s(REPLY_227).payload == REPLY_227 and not nat.live
    assert conn.alg.counters["unsolicited"] == 1


def test_only_a_passive_command_still_awaiting_its_reply_is_handed_over():
    nat = FakeKernel()
    conn = Conn(Driven(nat, pinhole_timeout=120.0, selected=True), nat, client=OUTSIDE, public=OUTSIDE,
                server=INSIDE, dest=PUBLIC)
    login(conn)
    conn.c(b"PASV\r\n")
    conn.s(REPLY_227)
    conn.c(b"RETR f\r\n")
    conn.alg.hand_over()
    assert nat.handed == {}
    conn.c(b"EPSV\r\n")
    conn.alg.hand_over()
    assert nat.handed == {conn.key: b"EPSV"}
