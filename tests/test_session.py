"""The FTP session state machine as playbooks: lines in, decisions out (no TCP, no addresses)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ftpalg.core.events import Close
from ftpalg.core.ftp import Form
from ftpalg.core.session import Decision, Session, Transfer


def play(script: list[tuple[str, bytes]], s: Session | None = None) -> tuple[Session, list[Decision]]:
    """('c', line) is a command from the client, ('s', line) a reply line from the server
    (to ``s``, a new Session by default). Announcements are taken as opened, like the table
    does when the pinhole works."""
    s = Session() if s is None else s
    out = []
    for side, line in script:
        d = s.command(line) if side == "c" else s.reply(line)
        if d.close:
            s.closed()
        if d.announce:
            s.opened(d.cmd)
        out.append(d)
    return s, out


LOGIN = [("s", b"220 hi\r\n"), ("c", b"USER anonymous\r\n"), ("s", b"331 pw\r\n"), ("c", b"PASS x\r\n"),
         ("s", b"230 in\r\n")]


def test_pasv_reply_announces_and_the_transfer_closes():
    s, out = play([*LOGIN, ("c", b"PASV\r\n"), ("s", b"227 Entering Passive Mode (10,1,0,2,195,149).\r\n"),
                   ("c", b"RETR f\r\n"), ("s", b"150 here\r\n"), ("s", b"226 done\r\n")])
    pasv = out[6]
    assert pasv.announce is not None and pasv.announce.form is Form.PASV
    assert (pasv.announce.addr, pasv.announce.port) == ("10.1.0.2", 50069)
    assert pasv.cmd == 3  # the PASV's index: USER, PASS, PASV
    assert out[8] == Decision()  # 150 is preliminary
    assert str(out[9].close) == "RETR finished (226)" and out[9].close.why is Close.USED
    assert s.live is None


def test_epsv_and_lpsv_replies():
    _, out = play([*LOGIN, ("c", b"EPSV\r\n"), ("s", b"229 Entering Extended Passive Mode (|||6446|)\r\n"),
                   ("c", b"LPSV\r\n"), ("s", b"228 Entering Long Passive Mode (4,4,10,1,0,2,2,195,149)\r\n")])
    assert out[6].announce.form is Form.EPSV and out[6].announce.port == 6446
    assert out[8].announce.form is Form.LPSV and str(out[8].close) == "replaced by a new LPSV"
    assert out[8].close.why is Close.REPLACED


def test_multi_line_227_announces_the_address_on_a_continuation_line_once():
    _, out = play([*LOGIN, ("c", b"PASV\r\n"), ("s", b"227-Entering Passive Mode\r\n"),
                   ("s", b" (10,1,0,2,4,1) and again (10,1,0,3,4,2)\r\n"), ("s", b"227 (10,1,0,4,4,3)\r\n"),
                   ("c", b"NOOP\r\n"), ("s", b"200 ok\r\n")])
    assert out[6] == Decision()
    assert out[7].announce.addr == "10.1.0.2" and out[7].announce.port == 1025
    assert out[8] == Decision()  # the first address found counts, once per reply
    assert out[10] == Decision()  # NOOP's reply: the queue stayed aligned


@given(st.sampled_from([b"227 Logout.\r\n", b"227 =\r\n", b"227\r\n", b"229 bye\r\n", b"228 nothing here\r\n"]))
def test_a_reply_code_without_address_is_just_a_reply(line):
    _, out = play([*LOGIN, ("c", b"PASV\r\n"), ("s", line), ("c", b"NOOP\r\n"), ("s", b"200 ok\r\n")])
    assert out[6] == Decision() and out[8] == Decision()


def test_unsolicited_227_opens_nothing():
    _, out = play([*LOGIN, ("s", b"227 (10,1,0,2,4,1)\r\n")])  # nothing pending
    assert out[5].announce is None and out[5].problem[0] == "unsolicited"
    _, out = play([*LOGIN, ("c", b"NOOP\r\n"), ("s", b"227 (10,1,0,2,4,1)\r\n")])  # answers NOOP
    assert out[6].announce is None and out[6].problem[0] == "unsolicited"
    _, out = play([*LOGIN, ("c", b"EPSV\r\n"), ("s", b"227 (10,1,0,2,4,1)\r\n")])  # wrong form
    assert out[6].announce is None and out[6].problem[0] == "unsolicited"
    _, out = play([("s", b"227 (10,1,0,2,4,1)\r\n")])  # instead of a greeting
    assert out[0].announce is None


def test_a_227_sent_by_the_client_opens_nothing():
    _, out = play([*LOGIN, ("c", b"227 Entering Passive Mode (10,0,0,2,4,1)\r\n")])
    assert out[5].announce is None and out[5].problem[0] == "unsolicited"


def test_pipelined_pasv_and_retr():
    s, out = play([*LOGIN, ("c", b"PASV\r\n"), ("c", b"RETR a\r\n"), ("c", b"PASV\r\n"), ("c", b"RETR b\r\n"),
                   ("s", b"227 (10,1,0,2,4,1)\r\n"), ("s", b"150 a\r\n"), ("s", b"226 a\r\n"),
                   ("s", b"227 (10,1,0,2,4,2)\r\n"), ("s", b"150 b\r\n"), ("s", b"226 b\r\n")])
    assert out[9].announce.port == 1025 and str(out[11].close) == "RETR finished (226)"
    assert out[12].announce.port == 1026 and out[12].close is None
    assert str(out[14].close) == "RETR finished (226)"


def test_port_refused_closes_its_own_pinhole_only():
    _, out = play([*LOGIN, ("c", b"PORT 10,0,0,2,4,1\r\n"), ("s", b"500 Illegal PORT command.\r\n")])
    assert out[5].announce.form is Form.PORT and str(out[6].close) == "server refused PORT (500)"
    assert out[6].close.why is Close.SERVER_REFUSED
    # a pipelined later PORT replaced the first; the refusal of the first leaves it alone
    _, out = play([*LOGIN, ("c", b"PORT 10,0,0,2,4,1\r\n"), ("c", b"EPRT |1|10.0.0.2|1026|\r\n"),
                   ("s", b"500 no\r\n"), ("s", b"200 ok\r\n")])
    assert str(out[6].close) == "replaced by a new EPRT"
    assert out[7] == Decision() and out[8] == Decision()


def test_transfer_sent_before_a_later_port_does_not_close_its_pinhole():
    _, out = play([*LOGIN, ("c", b"PORT 10,0,0,2,4,1\r\n"), ("c", b"RETR a\r\n"), ("c", b"LPRT 4,4,10,0,0,2,2,4,2\r\n"),
                   ("c", b"RETR b\r\n"), ("s", b"200 ok\r\n"), ("s", b"150 a\r\n"), ("s", b"226 a\r\n"),
                   ("s", b"200 ok\r\n"), ("s", b"226 b\r\n")])
    assert out[7].announce.form is Form.LPRT and str(out[7].close) == "replaced by a new LPRT"
    assert out[11].close is None  # RETR a (index 4) finished: the LPRT (index 5) pinhole stays
    assert out[11].done == Transfer(4, b"RETR", b"a", 226, b"a")  # (its audit record)
    assert str(out[13].close) == "RETR finished (226)"
    assert out[13].done == Transfer(6, b"RETR", b"b", 226, b"b")


def test_transfers_are_reported_with_user_path_and_outcome():
    s, out = play([("s", b"220 hi\r\n"), ("c", b"USER alice\r\n"), ("s", b"331 pw\r\n"),
                   ("c", b"PASS x\r\n"), ("s", b"230 ok\r\n"), ("c", b"STOR dir/new file.txt\r\n"),
                   ("s", b"150 go\r\n"), ("s", b"553-Could not create file.\r\n"), ("s", b"553 end\r\n"),
                   ("c", b"LIST\r\n"), ("s", b"226 done\r\n")])
    assert s.user == b"alice"
    assert out[8].done == Transfer(3, b"STOR", b"dir/new file.txt", 553, b"end")
    assert out[10].done == Transfer(4, b"LIST", b"", 226, b"done")
    assert [o.done for o in out].count(None) == len(out) - 2


def test_malformed_announcements_are_reported_not_announced():
    _, out = play([*LOGIN, ("c", b"PORT 10,0,0,2,999,1\r\n"), ("s", b"501 no\r\n"), ("c", b"PASV\r\n"),
                   ("s", b"227 (10,1,0,300,4,1)\r\n")])
    assert out[5].problem[0] == "malformed" and out[5].announce is None
    assert out[8].problem[0] == "malformed" and out[8].announce is None


@given(st.lists(st.tuples(st.sampled_from("cs"), st.binary(max_size=60)), max_size=40))
def test_any_input_gives_decisions_never_exceptions(script):
    s = Session()
    for side, line in script:
        d = s.command(line) if side == "c" else s.reply(line)
        assert isinstance(d, Decision)
        if d.announce:
            s.opened(d.cmd)
    assert len(s.pending) <= 64
