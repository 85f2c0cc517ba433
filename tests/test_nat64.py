"""NAT64 (RFC 6384): the grammar, the session's playbooks and the core with crafted packets,
for an IPv6-only client whose control connection ftpalg sees after the translator (Tayga),
from a pool address to an IPv4-only server."""

from __future__ import annotations

import ipaddress
import random
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_fuzz import _verdict_ok, address_line
from test_session import play as session_play

from alg_helpers import MASK, Conn, Driven, FakeKernel, FastConn, packed, pinhole_violations
from ftpalg.core import ftp
from ftpalg.core.direction import HOLD_SEGMENTS
from ftpalg.core.events import LineRewritten, PinholeOpened, Reason, Translation
from ftpalg.core.ftp import Form
from ftpalg.core.nat64 import Nat64, Xlat, embed
from ftpalg.core.session import ANSWER_EPSV_AF, ANSWER_EPSV_ALL, Decision, Session

POOL = "192.168.255.0/24"
PREFIX = "2001:db8:64::/96"
CLIENT = ("192.168.255.7", 40000)  # the IPv6 client, as the translator's pool address
SERVER = ("198.51.100.2", 21)
OUTSIDE = ("203.0.113.1", 61000)  # the gateway's outside address (MASQUERADE of the pool)
REPLY_227 = b"227 Entering Passive Mode (198,51,100,2,195,80).\r\n"  # 198.51.100.2:50000
EPRT6 = b"EPRT |2|2001:db8:1::10|50000|\r\n"


# ---- grammar -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix, v6", [  # RFC 6052 §2.4's table, for 192.0.2.33
    ("2001:db8::/32", "2001:db8:c000:221::"),
    ("2001:db8:100::/40", "2001:db8:1c0:2:21::"),
    ("2001:db8:122::/48", "2001:db8:122:c000:2:2100::"),
    ("2001:db8:122:300::/56", "2001:db8:122:3c0:0:221::"),
    ("2001:db8:122:344::/64", "2001:db8:122:344:c0:2:2100:0"),
    ("2001:db8:122:344::/96", "2001:db8:122:344::c000:221"),
])
def test_rfc6052_embedding(prefix, v6):
    assert ipaddress.IPv6Address(embed(ipaddress.IPv6Network(prefix), "192.0.2.33")) == ipaddress.IPv6Address(v6)


def test_configuration_recognises_pool_addresses_only():
    n = Nat64.of(["192.168.255.0/24", "10.64.0.0/16"], PREFIX)
    assert n is not None and n.translated(packed("192.168.255.200")) and n.translated(packed("10.64.3.4"))
    assert not n.translated(packed("192.168.254.7")) and not n.translated(packed("2001:db8::1"))
    assert Nat64.of([]) is None
    with pytest.raises(ValueError, match="RFC 6052"):
        Nat64.of([POOL], "2001:db8::/80")


def test_lines_ftpalg_writes_parse_back():
    assert ftp.line_end(b"EPSV\r\n") == b"\r\n" and ftp.line_end(b"EPSV\n") == b"\n" and ftp.line_end(b"X") == b""
    assert ftp.argument(b"epsv  all \r\n") == b"all" and ftp.argument(b"EPSV\r\n") == b""
    port = ftp.port_command("192.168.255.7", 50000, b"\r\n")
    assert port == b"PORT 192,168,255,7,195,80\r\n"
    hp = ftp.parse_hostport(port)
    assert hp is not None and (hp.addr, hp.port) == ("192.168.255.7", 50000)
    r229 = ftp.passive_reply(Form.EPSV, 50001, None, b"\r\n")
    assert r229 == b"229 Entering Extended Passive Mode (|||50001|)\r\n"
    assert ftp.parse_passive_reply(r229, 229).port == 50001
    r228 = ftp.passive_reply(Form.LPSV, 50002, "2001:db8:64::c633:6402", b"\n")
    hp = ftp.parse_passive_reply(r228, 228)
    assert r228.endswith(b")\n") and (hp.addr, hp.port, hp.family) == ("2001:db8:64::c633:6402", 50002, 6)


# ---- the session ---------------------------------------------------------------------------------
def xsession(selected: bool = False, prefix: str | None = PREFIX) -> Session:
    return Session(selected, Xlat(CLIENT[0], ipaddress.IPv6Network(prefix) if prefix else None))


def play(s: Session, script: list[tuple[str, bytes]]) -> list[Decision]:
    return session_play(script, s)[1]


LOGIN = [("s", b"220 hi\r\n"), ("c", b"USER anonymous\r\n"), ("s", b"331 pw\r\n"), ("c", b"PASS x\r\n"),
         ("s", b"230 in\r\n")]


@pytest.mark.parametrize("epsv", [b"EPSV\r\n", b"EPSV 2\r\n", b"epsv\n"])
def test_epsv_goes_as_pasv_and_its_227_comes_back_as_229(epsv):
    end = ftp.line_end(epsv)
    s = xsession()
    out = play(s, [*LOGIN, ("c", epsv), ("s", REPLY_227), ("c", b"RETR f\r\n"), ("s", b"226 done\r\n")])
    assert out[5].rewrite == b"PASV" + end and out[5].xlat is Translation.EPSV and out[5].announce is None
    reply = out[6]
    assert reply.announce.form is Form.PASV and (reply.announce.addr, reply.announce.port) == ("198.51.100.2", 50000)
    assert reply.render is Form.EPSV and reply.cmd == 3 and reply.xlat is Translation.REPLY
    assert out[8].close is not None and s.pending == [] and s.xlat.subs == {}


@pytest.mark.parametrize("cmd, answer", [(b"EPSV ALL\r\n", ANSWER_EPSV_ALL), (b"EPSV 1\r\n", ANSWER_EPSV_AF),
                                         (b"epsv 3\r\n", ANSWER_EPSV_AF), (b"ALGS STATUS64\r\n", b"216 EPSVEPRT")])
def test_commands_ftpalg_answers_go_as_noop_and_the_noop_reply_is_replaced(cmd, answer):
    s = xsession()
    out = play(s, [*LOGIN, ("c", cmd), ("s", b"200 NOOP ok.\r\n"), ("c", b"PASV\r\n"), ("s", REPLY_227)])
    assert out[5].rewrite == b"NOOP\r\n" and out[5].xlat is Translation.NOOP
    assert out[6].rewrite == answer + b"\r\n" and out[6].xlat is Translation.ANSWERED
    assert out[8].announce is not None and out[8].render is None  # the queue stayed aligned; PASV is not translated


def test_algs_enables_and_disables_translation_and_is_watched_while_disabled():
    s = xsession()
    out = play(s, [*LOGIN, ("c", b"ALGS DISABLE64\r\n"), ("s", b"200 NOOP ok.\r\n"),
                   ("c", b"EPSV\r\n"), ("s", b"229 Entering Extended Passive Mode (|||6446|)\r\n"),
                   ("c", b"ALGS STATUS64\r\n"), ("s", b"200 NOOP ok.\r\n"),
                   ("c", b"algs enable64\r\n"), ("s", b"200 NOOP ok.\r\n"), ("c", b"EPSV\r\n")])
    assert out[6].rewrite == b"216 NONE\r\n"
    assert out[7].rewrite is None and out[8].announce.form is Form.EPSV  # disabled: as any EPSV
    assert out[10].rewrite == b"216 NONE\r\n"
    assert out[11].rewrite == b"NOOP\r\n" and out[12].rewrite == b"216 EPSVEPRT\r\n"
    assert out[13].rewrite == b"PASV\r\n"


def test_other_algs_arguments_and_untranslated_connections_pass():
    s = xsession()
    assert play(s, [("c", b"ALGS FOO\r\n")])[0] == Decision()
    plain = Session()  # not a translated connection: nothing is answered for it
    assert play(plain, [*LOGIN, ("c", b"ALGS STATUS64\r\n"), ("c", b"EPSV ALL\r\n")])[5:] == [Decision(), Decision()]


def test_an_error_to_the_noop_is_relayed_as_the_answer_and_counted():
    s = xsession()
    out = play(s, [("s", b"220 hi\r\n"), ("c", b"ALGS STATUS64\r\n"), ("s", b"530 Please login.\r\n"),
                   ("c", b"USER x\r\n"), ("s", b"331 pw\r\n")])
    assert out[2].rewrite is None and out[2].problem[0] is Reason.NOOP_REFUSED
    assert out[4] == Decision() and s.pending == []


def test_multi_line_replies_to_translated_commands_become_one_line():
    s = xsession()
    out = play(s, [*LOGIN, ("c", b"EPSV ALL\r\n"), ("s", b"200-NOOP\r\n"), ("s", b" still\r\n"), ("s", b"200 ok\r\n"),
                   ("c", b"EPSV\r\n"), ("s", b"227-Entering Passive Mode (198,51,100,2,195,80)\r\n"),
                   ("s", b"227 done\r\n")])
    assert [d.rewrite for d in out[6:9]] == [b"", b"", ANSWER_EPSV_ALL + b"\r\n"]
    assert out[10].rewrite == b"" and out[10].announce.port == 50000 and out[10].render is None
    assert out[11].render is Form.EPSV and out[11].announce is None and out[11].cmd == 4


def test_a_refused_pasv_is_relayed_as_it_is():
    s = xsession()
    out = play(s, [*LOGIN, ("c", b"EPSV\r\n"), ("s", b"500 PASV not understood\r\n"), ("c", b"NOOP\r\n"),
                   ("s", b"200 ok\r\n")])
    assert out[6] == Decision() and out[8] == Decision() and s.pending == []


def test_eprt_and_lprt_of_an_ipv6_address_go_as_port_with_the_pool_address():
    s = xsession()
    lprt = b"LPRT 6,16," + b",".join(b"%d" % b for b in ipaddress.IPv6Address("2001:db8:1::10").packed) + b",2,195,81\n"
    out = play(s, [*LOGIN, ("c", EPRT6), ("s", b"200 ok\r\n"), ("c", lprt), ("s", b"200 ok\r\n")])
    assert out[5].rewrite == b"PORT 192,168,255,7,195,80\r\n" and out[5].xlat is Translation.EPRT
    assert (out[5].announce.form, out[5].announce.addr, out[5].announce.port) == (Form.PORT, CLIENT[0], 50000)
    assert out[5].announce.span == (5, 25)  # into the rewritten line
    assert out[7].rewrite == b"PORT 192,168,255,7,195,81\n" and out[7].xlat is Translation.LPRT
    assert s.xlat.client6 == "2001:db8:1::10"


@pytest.mark.parametrize("line", [b"EPRT |1|192.168.255.7|50000|\r\n", b"EPRT |2|2001:db8:64::a00:1|50000|\r\n",
                                  b"EPRT |2|nonsense|1|\r\n"])
def test_eprt_of_ipv4_or_of_an_address_under_the_prefix_is_not_translated(line):
    d = play(xsession(), [("c", line)])[0]
    assert d.rewrite is None  # read as on any connection: the policy (or the grammar) says what it opens


def test_lpsv_needs_the_prefix():
    assert play(xsession(), [("c", b"LPSV\r\n")])[0].rewrite == b"PASV\r\n"
    assert play(xsession(prefix=None), [("c", b"LPSV\r\n")])[0].rewrite is None


def test_pipelined_translated_commands_pair_with_their_replies():
    s = xsession()
    out = play(s, [*LOGIN, ("c", b"EPSV ALL\r\n"), ("c", b"TYPE I\r\n"), ("c", b"EPSV\r\n"),
                   ("s", b"200 NOOP ok\r\n"), ("s", b"200 Type set\r\n"), ("s", REPLY_227)])
    assert out[8].rewrite == ANSWER_EPSV_ALL + b"\r\n" and out[9] == Decision() and out[10].render is Form.EPSV


def test_a_translation_that_could_not_be_sent_gets_the_servers_own_reply():
    s = xsession()
    play(s, [*LOGIN, ("c", b"EPSV ALL\r\n")])
    s.untranslated(3)
    assert s.pending == [(b"EPSV", 3)]
    assert play(s, [("s", b"200 EPSV ALL ok\r\n")]) == [Decision()]
    play(s, [("c", b"ALGS DISABLE64\r\n")])
    assert not s.xlat.enabled
    s.untranslated(4)  # the server got the ALGS: translation stays as it was
    assert s.xlat.enabled and s.pending == [(b"ALGS", 4)]


def test_auth_ends_translation():
    s = xsession()
    play(s, [*LOGIN, ("c", b"AUTH TLS\r\n"), ("s", b"234 go\r\n")])
    assert s.encrypted  # the caller reads no more lines of it: nothing is translated


def test_selected_mode_pairs_the_noop_reply_past_commands_whose_replies_are_not_queued():
    s = xsession(selected=True)
    out = play(s, [("c", b"PORT 192,168,255,7,195,80\r\n"), ("c", b"EPSV ALL\r\n"), ("s", b"200 NOOP ok\r\n"),
                   ("c", b"EPSV\r\n"), ("c", b"ALGS STATUS64\r\n"), ("s", REPLY_227), ("s", b"200 ok\r\n")])
    assert out[2].rewrite == ANSWER_EPSV_ALL + b"\r\n"
    assert out[5].render is Form.EPSV and out[5].announce is not None
    assert out[6].rewrite == b"216 EPSVEPRT\r\n" and not s.xlat.owed


# ---- the core, with crafted packets -----------------------------------------------------------------
@pytest.fixture
def env():
    kernel = FakeKernel()
    alg = Driven(kernel, nat64=Nat64.of([POOL], PREFIX))
    conn = Conn(alg, kernel, client=CLIENT, server=SERVER, public=OUTSIDE)
    conn.s(b"220 hi\r\n")
    return alg, kernel, conn


def test_epsv_to_a_server_without_epsv(env):
    alg, kernel, conn = env
    start = conn.cseq
    assert conn.c(b"EPSV\r\n").payload == b"PASV\r\n"
    assert conn.s(REPLY_227).payload == b"229 Entering Extended Passive Mode (|||50000|)\r\n"
    (ph,) = kernel.live.values()
    assert (ph.peer, ph.public, ph.public_port, ph.inside, ph.inside_port, ph.snat) == (
        CLIENT[0], SERVER[0], 50000, SERVER[0], 50000, OUTSIDE[0])
    seg = conn.c(b"RETR f\r\n")  # same length: no correction of the client's stream
    assert seg.seq == (start + 6) & MASK and alg.counters["nat64_epsv"] == alg.counters["nat64_reply"] == 1
    opened = next(ev for ev in alg.seen if isinstance(ev, PinholeOpened))
    assert opened.line == REPLY_227 and opened.sent.startswith(b"229 ")


def test_a_227_naming_another_address_is_answered_425_and_counted(env):
    alg, kernel, conn = env
    conn.c(b"EPSV\r\n")
    out = conn.s(b"227 Entering Passive Mode (10,9,9,9,195,80).\r\n")
    assert out.payload.startswith(b"425 ") and not kernel.live
    assert alg.counters["refused"] == 1 and alg.counters["nat64_refused"] == 1


def test_epsv_all_is_answered_504_and_the_session_goes_on(env):
    """The command shrinks (EPSV ALL -> NOOP), the reply grows (200 NOOP ok. -> 504 ...): the
    server's and the client's numbering both stay right, for what follows too."""
    alg, kernel, conn = env
    c0, s0 = conn.cseq, conn.sseq
    assert conn.c(b"EPSV ALL\r\n").payload == b"NOOP\r\n"
    noop_reply = b"200 NOOP ok.\r\n"
    got = conn.s(noop_reply)
    assert got.payload == ANSWER_EPSV_ALL + b"\r\n"
    assert got.ack == (c0 + 10) & MASK  # the server acked 6 bytes: the client sees its 10 acked
    seg = conn.c(b"EPSV\r\n")
    assert seg.seq == (c0 + 6) & MASK and seg.payload == b"PASV\r\n"
    got = conn.s(REPLY_227)
    grow = len(ANSWER_EPSV_ALL) + 2 - len(noop_reply)
    assert got.seq == (s0 + len(noop_reply) + grow) & MASK and got.payload.startswith(b"229 ")
    assert got.ack == (c0 + 16) & MASK
    rewritten = [ev for ev in alg.seen if isinstance(ev, LineRewritten)]
    assert [ev.xlat for ev in rewritten] == [Translation.NOOP, Translation.ANSWERED, Translation.EPSV,
                                              Translation.REPLY]


def test_retransmissions_of_translated_segments_are_byte_identical(env):
    alg, kernel, conn = env
    c0, s0 = conn.cseq, conn.sseq
    first_c = conn.c(b"ALGS STATUS64\r\n")
    first_s = conn.s(b"200 NOOP ok.\r\n")
    again = conn.c(b"ALGS STATUS64\r\n", seq=c0)  # resent: the same NOOP, no second substitution
    assert (again.seq, again.payload) == (first_c.seq, first_c.payload) == (c0, b"NOOP\r\n")
    conn.sseq = s0
    again = conn.s(b"200 NOOP ok.\r\n")
    assert (again.seq, again.payload) == (first_s.seq, first_s.payload) == (s0, b"216 EPSVEPRT\r\n")
    assert alg.counters["nat64_noop"] == alg.counters["nat64_answered"] == 1
    assert conn.c(b"PASV\r\n").seq == (c0 + 6) & MASK


def test_a_split_epsv_is_put_together(env):
    alg, kernel, conn = env
    c0 = conn.cseq
    assert conn.c(b"EP") is None  # held for the rest
    second = conn.c(b"SV ALL\r\n")
    ((_, first),) = conn.released
    assert first.payload + second.payload == b"NOOP\r\n" and first.seq == c0
    assert conn.s(b"200 NOOP ok.\r\n").payload == ANSWER_EPSV_ALL + b"\r\n"


def test_a_split_noop_reply_is_held_and_replaced(env):
    alg, kernel, conn = env
    conn.c(b"ALGS STATUS64\r\n")
    assert conn.s(b"200 NO") is None
    rest = conn.s(b"OP ok.\r\n")
    ((_, first),) = conn.released
    assert first.payload + rest.payload == b"216 EPSVEPRT\r\n"


def test_pipelined_commands_in_one_segment(env):
    alg, kernel, conn = env
    out = conn.c(b"TYPE I\r\nEPSV ALL\r\nEPSV\r\n")
    assert out.payload == b"TYPE I\r\nNOOP\r\nPASV\r\n"
    out = conn.s(b"200 Type set\r\n200 NOOP ok\r\n" + REPLY_227)
    assert out.payload == (b"200 Type set\r\n" + ANSWER_EPSV_ALL + b"\r\n"
                           + b"229 Entering Extended Passive Mode (|||50000|)\r\n")


def test_eprt_goes_to_the_server_as_port_naming_the_gateway(env):
    alg, kernel, conn = env
    out = conn.c(EPRT6)
    assert out.payload == b"PORT 203,0,113,1,195,80\r\n"
    (ph,) = kernel.live.values()
    assert (ph.peer, ph.public, ph.public_port, ph.inside, ph.inside_port) == (
        SERVER[0], OUTSIDE[0], 50000, CLIENT[0], 50000)
    assert alg.counters["nat64_eprt"] == 1
    assert alg.flows[conn.key][0].session.xlat.client6 == "2001:db8:1::10"


def test_after_auth_nothing_is_translated_and_corrections_stay(env):
    alg, kernel, conn = env
    c0 = conn.cseq
    conn.c(b"EPSV ALL\r\n")  # 4 bytes shorter toward the server
    conn.s(b"200 NOOP ok.\r\n")
    conn.c(b"AUTH TLS\r\n")
    conn.s(b"234 go\r\n")
    seg = conn.c(b"EPSV ALL\r\n")  # (TLS in real life): goes as it came, still shifted
    assert seg.payload == b"EPSV ALL\r\n" and seg.seq == (c0 + 10 - 4 + 10) & MASK
    assert alg.counters["nat64_noop"] == 1


def test_connections_from_outside_the_pool_are_not_translated():
    kernel = FakeKernel()
    alg = Driven(kernel, nat64=Nat64.of([POOL], PREFIX))
    conn = Conn(alg, kernel, client=("10.0.0.2", 40000), server=SERVER, public=OUTSIDE)
    conn.s(b"220 hi\r\n")
    assert conn.c(b"EPSV ALL\r\n") .payload == b"EPSV ALL\r\n"
    assert conn.c(b"ALGS STATUS64\r\n").payload == b"ALGS STATUS64\r\n"


def test_the_seqadj_oracle_agrees_over_a_long_translated_session(env):
    """Many translations that shrink and grow both streams: every segment each peer gets is
    where its stream says (FakeKernel applies the corrections the core asked for)."""
    alg, kernel, conn = env
    for i in range(12):
        c_before, s_before = conn.s_rcv, conn.c_rcv
        cmd = [b"EPSV ALL\r\n", b"ALGS STATUS64\r\n", b"EPSV\r\n", EPRT6][i % 4]
        seg = conn.c(cmd)
        assert seg.seq == c_before
        reply = REPLY_227 if cmd == b"EPSV\r\n" else b"200 ok\r\n"
        got = conn.s(reply)
        assert got.seq == s_before and got.ack == conn.cseq
    assert alg.counters["nat64_answered"] == 6 and alg.counters["nat64_reply"] == 3


def test_run_translates_with_the_pool_it_is_given_and_says_so(tmp_path, monkeypatch, caplog):
    import logging

    from test_config import Recorder, fake_linux, parse

    from ftpalg import config
    from ftpalg.linux.serve import serve

    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "none.toml")
    fake_linux(monkeypatch)
    with caplog.at_level(logging.INFO, logger="ftpalg"):
        assert serve(parse("run", "--nat64-pool", POOL, "--status-socket", "", "--metrics-listen", "")) == 0
    assert Recorder.calls["Alg"][1]["nat64"] == Nat64.of([POOL])
    assert f"NAT64 (RFC 6384): control connections from {POOL} are translated" in caplog.text


def test_the_options_reach_the_core(tmp_path, monkeypatch):
    from ftpalg import cli, config

    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "none.toml")
    args = cli.parser().parse_args(["run", "--nat64-pool", "192.168.255.0/24,10.64.0.0/16", "--nat64-prefix", PREFIX])
    n = cli.config_from_args(args).alg_kwargs()["nat64"]
    assert n == Nat64.of(["192.168.255.0/24", "10.64.0.0/16"], PREFIX)
    assert cli.config_from_args(cli.parser().parse_args(["run"])).alg_kwargs()["nat64"] is None


# ---- what people see: status, metrics, audit --------------------------------------------------------
def test_status_metrics_and_audit_show_the_translated_connection():
    from collections import Counter

    from prometheus_client import CollectorRegistry, generate_latest

    from ftpalg.linux import metrics
    from ftpalg.linux.engine import Engine
    from ftpalg.linux.status import render

    records: list[dict] = []
    kernel = FakeKernel()
    alg = Driven(kernel, nat64=Nat64.of([POOL], PREFIX), on_transfer=records.append)
    conn = Conn(alg, kernel, client=CLIENT, server=SERVER, public=OUTSIDE)
    conn.s(b"220 hi\r\n")
    conn.c(EPRT6)
    conn.s(b"200 ok\r\n")
    conn.c(b"RETR f\r\n")
    conn.s(b"226 done\r\n")
    conn.c(b"EPSV ALL\r\n")
    conn.s(b"200 NOOP ok\r\n")
    (flow,) = alg.snapshot(1.0)["flows"]
    assert flow["nat64"] == {"pool_address": CLIENT[0], "client6": "2001:db8:1::10", "enabled": True,
                             "translated": 2}
    text = render({**alg.snapshot(1.0), "pid": 1})
    assert "192.168.255.7:40000 (2001:db8:1::10)" in text and " nat64" in text
    assert "nat64 translations: answered=1 eprt=1 noop=1" in text
    (rec,) = records
    assert rec["client"] == "192.168.255.7:40000" and rec["nat64"] == {"client6": "2001:db8:1::10", "translated": True}
    assert rec["mode"] == "PORT" and rec["outcome"] == "ok"
    reg = CollectorRegistry()
    eng = Engine(alg, alg.accounting, metrics.LatencyHistogram(), Counter())
    reg.register(metrics.AlgCollector(eng.metrics_view))
    out = generate_latest(reg).decode()
    for line in ('ftpalg_nat64_translations_total{kind="eprt"} 1.0',
                 'ftpalg_nat64_translations_total{kind="noop"} 1.0',
                 'ftpalg_nat64_translations_total{kind="refused"} 0.0',
                 'ftpalg_refusals_total{reason="noop_refused"} 0.0'):
        assert line in out, line


def test_explain_replays_a_capture_from_the_translators_ipv4_side(tmp_path, capsys):
    """A capture taken on the IPv4 side of Tayga without ftpalg (the server has no EPSV):
    explain with the pool says what ftpalg would have sent instead."""
    from scapy.layers.inet import IP, TCP
    from scapy.utils import wrpcap

    from ftpalg.cli import main

    c, s = CLIENT[0], SERVER[0]
    seq = {True: 1000, False: 5000}
    pkts = []
    for i, (from_client, flags, payload) in enumerate([
            (True, "S", b""), (False, "SA", b""), (True, "A", b""), (False, "PA", b"220 hi\r\n"),
            (True, "PA", b"EPSV ALL\r\n"), (False, "PA", b"200 EPSV ALL ok\r\n"),
            (True, "PA", b"EPSV\r\n"), (False, "PA", b"502 Command 'EPSV' not implemented\r\n")]):
        src, dst, sp, dp = (c, s, CLIENT[1], 21) if from_client else (s, c, 21, CLIENT[1])
        p = IP(src=src, dst=dst) / TCP(sport=sp, dport=dp, seq=seq[from_client], ack=seq[not from_client] if i else 0,
                                       flags=flags) / payload
        seq[from_client] += len(payload) + (1 if "S" in flags else 0)
        p.time = 1000.0 + i / 100
        pkts.append(p)
    path = tmp_path / "nat64.pcap"
    wrpcap(str(path), pkts)
    main(["explain", str(path), "--public", OUTSIDE[0], "--nat64-pool", POOL])
    out = capsys.readouterr().out
    assert "NAT64 translation (noop): EPSV ALL -> NOOP" in out
    assert f"NAT64 translation (answered): 200 EPSV ALL ok -> {ANSWER_EPSV_ALL.decode()}" in out
    assert "NAT64 translation (epsv): EPSV -> PASV" in out
    main(["explain", str(path), "--public", OUTSIDE[0]])
    assert "NAT64" not in capsys.readouterr().out
    assert main(["explain", str(path), "--nat64-pool", "nonsense"]) == 2


def test_a_multi_line_227_becomes_one_229_its_other_lines_left_out(env):
    """Lines of a translated multi-line reply are left out, each in its own segment: those go
    as bare ACKs, and the server's numbering after them stays right."""
    alg, kernel, conn = env
    conn.c(b"EPSV\r\n")
    s0 = conn.c_rcv
    first = conn.s(b"227-Entering Passive Mode (198,51,100,2,195,80)\r\n")
    middle = conn.s(b" more text\r\n")
    last = conn.s(b"227 ok\r\n")
    assert (first.seq, first.payload, middle.seq, middle.payload) == (s0, b"", s0, b"")
    r229 = b"229 Entering Extended Passive Mode (|||50000|)\r\n"
    assert (last.seq, last.payload) == (s0, r229) and len(kernel.live) == 1
    after = conn.s(b"200 next\r\n")
    assert after.seq == (s0 + len(r229)) & MASK
    assert alg.counters["nat64_removed"] == 2


# ---- selected queueing: the same bytes and pinholes as full queueing -----------------------------------
def _translated_script(rng) -> list[tuple[str, bytes]]:
    """A translated session: ordinary lines, and the forms an IPv6 client sends, each answered
    the way an IPv4 server answers what it gets (PASV, PORT, NOOP)."""
    from test_selected import LINES_C, LINES_S

    out: list[tuple[str, bytes]] = []
    for _ in range(rng.randint(2, 6)):
        port = rng.randint(1024, 65535)
        pre_c = b"".join(rng.choice(LINES_C) for _ in range(rng.randint(0, 2)))
        if pre_c:
            out += [("c", pre_c), ("s", b"".join(rng.choice(LINES_S) for _ in pre_c.splitlines()))]
        mode = rng.choice(["epsv", "eprt", "answered", "multi", "lpsv"])
        h = b"198,51,100,2,%d,%d" % divmod(port, 256)
        if mode == "eprt":
            out += [("c", b"EPRT |2|2001:db8:1::10|%d|\r\n" % port), ("s", b"200 PORT command successful.\r\n")]
        elif mode == "answered":
            cmd = rng.choice([b"EPSV ALL\r\n", b"EPSV 1\r\n", b"ALGS STATUS64\r\n", b"algs enable64\r\n"])
            out += [("c", cmd), ("s", rng.choice([b"200 NOOP ok.\r\n", b"200-NOOP\r\n200 ok\r\n"]))]
            continue
        elif mode == "multi":
            out += [("c", b"EPSV\r\n"), ("s", rng.choice([b"227-Entering Passive Mode\r\n =%s\r\n227 OK\r\n",
                                                       b"227-Entering Passive Mode (%s)\r\n more\r\n227 OK\r\n"]) % h)]
        else:
            out += [("c", b"EPSV\r\n" if mode == "epsv" else b"LPSV\r\n"),
                    ("s", b"227 Entering Passive Mode (%s).\r\n" % h)]
        out += [("c", b"RETR f\r\n"), ("s", b"150 go\r\n226 done\r\n")]
    return out


def test_selected_queueing_translates_as_full_queueing():
    from test_selected import _cut, _run

    topo = {"client": CLIENT, "server": SERVER, "public": OUTSIDE}
    nat64 = Nat64.of([POOL], PREFIX)
    rng = random.Random(20261207)
    opened = 0
    for i in range(40):
        script = _translated_script(rng)
        steps = [(side, _cut(rng, side, data)) for side, data in script]
        full, sel = _run("", steps, False, topo, nat64), _run("", steps, True, topo, nat64)
        assert full[:3] == sel[:3], f"session {i}: {steps!r}"
        opened += len(full[2])
        # whole lines (a split line whose translation is shorter than its first part is not translated)
        whole = _run("", [(side, [data]) for side, data in script], True, topo, nat64)
        assert b"NOOP" not in whole[1] and not re.search(rb"(^|\n)227", whole[1]), script
        assert not any(v in whole[0].upper() for v in (b"EPSV", b"EPRT", b"LPSV", b"ALGS")), script
    assert opened >= 40


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_segmentation_reordering_and_duplication_gives_the_translated_stream(data):
    """The client's translated commands cut into segments at random, some doubled, some
    swapped: the server reassembles exactly the translated stream (a line split so that its
    first parts are longer than its translation goes as it came, by design), and every copy
    of a segment carries the bytes the first one did."""
    kernel = FakeKernel()
    alg = Driven(kernel, nat64=Nat64.of([POOL], PREFIX))
    conn = Conn(alg, kernel, client=CLIENT, server=SERVER, public=OUTSIDE)
    conn.s(b"220 hi\r\n")
    cmds = [(b"TYPE I\r\n", b"TYPE I\r\n"), (b"EPSV ALL\r\n", b"NOOP\r\n"), (b"EPSV\r\n", b"PASV\r\n"),
            (EPRT6, b"PORT 203,0,113,1,195,80\r\n"), (b"ALGS STATUS64\r\n", b"NOOP\r\n"), (b"NOOP\r\n", b"NOOP\r\n")]
    stream = b"".join(c for c, _ in cmds)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=8)))
    bounds = list(zip([0, *cuts], [*cuts, len(stream)], strict=True))
    want, at = b"", 0
    for c, new in cmds:
        inside = [x - at for x in cuts if at < x < at + len(c)]
        assume(len(inside) < HOLD_SEGMENTS)  # a line over more segments goes unchanged, by design
        want += new if not inside or inside[-1] <= len(new) else c
        at += len(c)
    order = list(range(len(bounds)))
    for i in range(len(order) - 1):
        if data.draw(st.booleans()):
            order[i], order[i + 1] = order[i + 1], order[i]
    sends = [i for i in order for _ in range(data.draw(st.integers(1, 2)))] + list(range(len(bounds)))
    start = conn.cseq
    got: dict[int, bytes] = {}
    for i in sends:
        lo, hi = bounds[i]
        seg = conn.c(stream[lo:hi], seq=(start + lo) & MASK)
        for pkt in [p for _, p in conn.released] + ([seg] if seg is not None else []):
            if pkt is not None and pkt.payload:
                assert got.setdefault((pkt.seq - start) & MASK, pkt.payload) == pkt.payload
    alg.expire_held(conn.now + 10)
    alg.take_released()
    rebuilt = bytearray()
    for off in sorted(got):
        rebuilt[off : off + len(got[off])] = got[off]
    assert bytes(rebuilt) == want


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(st.integers(0, 2**32 - 1))
def test_hostile_lines_on_a_translated_connection(seed):
    """Random translated commands, address lines and replies (hostile ones among them), cut
    anywhere and interleaved both ways: every verdict is a well-formed packet, and every live
    pinhole is one the policy allows for this connection."""
    rng = random.Random(seed)
    kernel = FakeKernel()
    alg = Driven(kernel, rng=random.Random(7), nat64=Nat64.of([POOL], PREFIX), selected=rng.random() < 0.5)
    conn = FastConn(alg, kernel, client=CLIENT, server=SERVER, public=OUTSIDE)
    conn.s(b"220 hi\r\n")
    addrs = [CLIENT[0], SERVER[0], SERVER[0], SERVER[0], "2001:db8:1::10", "2001:db8:64::a00:1", "10.9.9.9"]
    words_c = [b"EPSV", b"EPSV ALL", b"EPSV 1", b"EPSV 2", b"EPSV x", b"LPSV", b"ALGS STATUS64", b"ALGS ENABLE64",
               b"ALGS DISABLE64", b"ALGS", b"algs status64", b"NOOP", b"RETR f", b"AUTH TLS", b"EPRT |2|::1|0|",
               EPRT6.strip(), b"EPRT |2|2001:db8:1::10|25|", b"LPRT 6,16,32,1,13,184,0,1,0,0,0,0,0,0,0,0,0,16,2,195,81"]
    words_s = [b"200 NOOP ok.", b"200-NOOP", b"200 ok", b"227-x", b"227 x", b"500 no", b"530 login", b"226 done",
               b"150 go", b"234 go", b"421 bye"]
    for _ in range(20):
        side = rng.choice("cs")
        lines = b""
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.4:
                body = address_line(rng, addrs, side)
            else:
                body = rng.choice(words_c if side == "c" else words_s) + rng.choice([b"\r\n", b"\n", b"\r\n", b""])
            lines += body if body.endswith(b"\n") else body + b"\r\n"
        cut = rng.randrange(0, len(lines)) if rng.random() < 0.3 else 0
        for piece in ([lines[:cut], lines[cut:]] if cut else [lines]):
            conn.c(piece) if side == "c" else conn.s(piece)  # FastConn checks every packet it gets back
            assert not pinhole_violations(alg, kernel), (seed, lines)
        conn.now += 0.2
        alg.on_timer(conn.now)
        for _, o in alg.take_released():
            assert _verdict_ok(o)
    alg.shutdown()
    assert not kernel.live


def test_the_steady_walk_translates_as_the_general_walk():
    """test_steady's comparison on translated connections: sessions of translated commands,
    address lines and replies, cut, skewed, doubled, with timer runs, through the short walk
    and through the general walk alone: the same verdicts, counters, state and pinholes."""
    from test_fuzz import FLAGS, SKEWS, WAITS
    from test_steady import _run

    topo = {"client": CLIENT, "server": SERVER, "public": OUTSIDE}
    nat64 = Nat64.of([POOL], PREFIX)
    rng = random.Random(20261207)
    addrs = [CLIENT[0], SERVER[0], SERVER[0], SERVER[0], "2001:db8:1::10", "10.9.9.9"]
    words = {"c": [b"EPSV\r\n", b"EPSV ALL\r\n", b"EPSV 1\r\n", b"LPSV\r\n", b"ALGS STATUS64\r\n",
                   b"ALGS DISABLE64\r\n", b"ALGS ENABLE64\r\n", EPRT6, b"TYPE I\r\n", b"RETR f\r\n"],
             "s": [REPLY_227, b"200 NOOP ok.\r\n", b"200-NOOP\r\n200 ok\r\n", b"227-x\r\n", b"500 no\r\n",
                   b"150 go\r\n226 done\r\n"]}
    for i in range(120):
        steps = []
        for n in range(rng.randint(2, 12)):
            side = "cs"[n % 2]
            data = b"".join(rng.choice(words[side]) if rng.random() < 0.7 else address_line(rng, addrs, side)
                            for _ in range(rng.randint(1, 3)))
            cuts = sorted(rng.sample(range(1, len(data)), min(rng.choice([0, 0, 0, 1, 2]), len(data) - 1)))
            segs = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
            steps.append((side, segs, rng.choice(FLAGS), rng.choice(SKEWS), rng.random() < 0.15, rng.choice(WAITS)))
        fast, slow = _run("", steps, True, topo, nat64), _run("", steps, False, topo, nat64)
        for what, a, b in zip(("verdicts", "counters", "state", "pinholes"), fast, slow, strict=True):
            assert a == b, f"session {i} ({what} differ), steps {steps!r}"


def test_the_last_line_of_a_translated_multi_line_reply_split_is_held_and_translated(env):
    alg, kernel, conn = env
    conn.c(b"EPSV\r\n")
    got = [conn.s(b"227-Entering Passive Mode (198,51,100,2,195,80)\r\n more\r\n227 O")]
    last = conn.s(b"K\r\n")
    got += [p for _, p in conn.released] + [last]
    assert b"".join(p.payload for p in got if p is not None) == b"229 Entering Extended Passive Mode (|||50000|)\r\n"
