import pytest
from hypothesis import given
from hypothesis import strategies as st

from ftpalg.core.seqadj import MASK, MAX_EDITS, SeqAdjust, Unreplayable, diff


def test_no_edits_is_identity():
    a = SeqAdjust()
    assert a.forward(1234) == 1234 and a.backward(1234) == 1234


@pytest.mark.parametrize("grow", [4, -3])
def test_single_edit_maps_both_ways(grow):
    a = SeqAdjust()
    line_len = 22
    a.add(1000, line_len, b"x" * (line_len + grow))
    assert a.forward(1000) == 1000  # the rewritten segment itself keeps its seq
    assert a.forward(1000 + line_len) == 1000 + line_len + grow  # later data is shifted
    assert a.backward(1000 + line_len + grow) == 1000 + line_len  # ack of the whole line
    assert a.backward(1000) == 1000  # ack before the edit is unchanged
    assert a.backward(1005) == 1000  # ack inside the new bytes: start of the line again


def test_edits_accumulate():
    a = SeqAdjust()
    a.add(100, 20, b"y" * 24)  # +4
    a.add(200, 20, b"y" * 17)  # -3
    assert a.delta == 1
    assert a.forward(150) == 154
    assert a.forward(220) == 221
    assert a.backward(221) == 220
    assert a.backward(154) == 150


def test_wraparound():
    a = SeqAdjust()
    start = MASK - 10  # the line crosses 2**32
    a.add(start, 22, b"z" * 26)
    end = (start + 22) & MASK
    assert end < start
    assert a.forward(end) == (end + 4) & MASK
    assert a.backward((end + 4) & MASK) == end
    assert a.forward(start) == start


@given(st.integers(0, MASK), st.lists(st.integers(-8, 8), min_size=1, max_size=MAX_EDITS),
       st.integers(0, 5000))
def test_backward_inverts_forward_outside_edits(base, deltas, probe):
    a = SeqAdjust()
    pos = base
    for d in deltas:
        pos = (pos + 100) & MASK
        a.add(pos, 20, b"a" * (20 + d))
        pos = (pos + 20) & MASK
    x = (pos + probe) & MASK  # anywhere after the last edit
    assert a.backward(a.forward(x)) == x
    assert diff(a.forward(x), x) == sum(deltas)


def test_replay_is_byte_identical():
    a = SeqAdjust()
    a.add(1010, 10, b"0123456789AB")
    seg = b"x" * 10 + b"ORIGINAL!\n" + b"tail"
    out = a.replay(1000, seg)
    assert out == b"x" * 10 + b"0123456789AB" + b"tail"
    assert a.replay(1000, seg) == out


def test_replay_cuts_before_partly_covered_edit():
    a = SeqAdjust()
    a.add(1010, 10, b"0123456789AB")
    assert a.replay(1000, b"x" * 15) == b"x" * 10


def test_replay_inside_edit_raises():
    a = SeqAdjust()
    a.add(1010, 10, b"0123456789AB")
    with pytest.raises(Unreplayable):
        a.replay(1015, b"56789")


def test_old_edits_fold_into_base():
    a = SeqAdjust()
    for i in range(MAX_EDITS + 5):
        a.add(i * 100, 10, b"b" * 11)
    assert len(a.edits) == MAX_EDITS
    assert a.delta == MAX_EDITS + 5
    far = 100 * (MAX_EDITS + 10)
    assert a.forward(far) == far + MAX_EDITS + 5


def test_kernel_adjustment_model_follows_nf_ct_seqadj_set():
    from ftpalg.core.seqadj import KernelAdj

    k = KernelAdj().add(1000, 5)  # first change: the point is the segment's seq
    assert (k.pos, k.before, k.after) == (1000, 0, 5)
    assert k.add(1000, 2) == KernelAdj(1000, 0, 7)  # a second change in the same segment
    k = k.add(2000, -3)  # a later segment moves the point
    assert (k.pos, k.before, k.after) == (2000, 5, 2)
    assert k.add(1500, 9) == k  # an older segment (a retransmission) changes nothing
    assert k.seq_offset(2000) == 5 and k.seq_offset(2001) == 2 and k.seq_offset(1000) == 5
    # acks are in the receiver's (shifted) numbering: compared after removing 'before'
    assert k.ack_offset(2000 + 5) == 5 and k.ack_offset(2000 + 5 + 1) == 2


def test_kernel_adjustment_model_wraps():
    from ftpalg.core.seqadj import KernelAdj

    k = KernelAdj().add(MASK - 2, 4).add(5, 1)  # the second segment is after the first, modulo 2**32
    assert (k.pos, k.before, k.after) == (5, 4, 5)
    assert k.seq_offset(MASK) == 4 and k.seq_offset(6) == 5
