import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ftpalg.core import ftp
from ftpalg.core.ftp import Form


@pytest.mark.parametrize(
    "line, addr, port",
    [
        (b"PORT 10,0,0,2,195,80\r\n", "10.0.0.2", 50000),
        (b"port 10,0,0,2,0,21\r\n", "10.0.0.2", 21),
        (b"Port 192,168,1,10,255,255\n", "192.168.1.10", 65535),
        (b"PORT 10, 0, 0, 2, 4, 1\r\n", "10.0.0.2", 1025),
    ],
)
def test_port_parses(line, addr, port):
    hp = ftp.parse_hostport(line)
    assert hp is not None and (hp.form, hp.addr, hp.port, hp.family) == (Form.PORT, addr, port, 4)


@pytest.mark.parametrize(
    "line, addr, port, delim",
    [
        (b"EPRT |1|10.0.0.2|50000|\r\n", "10.0.0.2", 50000, "|"),
        (b"eprt !1!10.0.0.2!1025!\r\n", "10.0.0.2", 1025, "!"),
        (b"EPRT |2|fd00::2|6446|\r\n", "fd00::2", 6446, "|"),
    ],
)
def test_eprt_parses(line, addr, port, delim):
    hp = ftp.parse_hostport(line)
    assert hp is not None and (hp.form, hp.addr, hp.port, hp.delim) == (Form.EPRT, addr, port, delim)


@pytest.mark.parametrize(
    "line",
    [
        b"PORT 10,0,0,2,195\r\n",  # five numbers
        b"PORT 10,0,0,256,1,1\r\n",  # above 255
        b"PORT 10,0,0,2,0,0\r\n",  # port 0
        b"PORT 10,0,0,2,1,1 extra\r\n",
        b"PORT 10,0,0,2,1,1,\r\n",
        b"EPRT |1|10.0.0.2|50000\r\n",  # missing closing delimiter
        b"EPRT |3|10.0.0.2|50000|\r\n",  # unknown family
        b"EPRT |1|fd00::2|50000|\r\n",  # family mismatch
        b"EPRT |1|10.0.0.2|70000|\r\n",
        b"EPRT 1110.0.0.21500001\r\n",  # digit delimiter
        b"EPRT |1|10.0.0.2|0|\r\n",
        b"EPRT |1|10.0.0.2||\r\n",
    ],
)
def test_malformed_raises(line):
    with pytest.raises(ftp.ParseError):
        ftp.parse_hostport(line)


@pytest.mark.parametrize("line", [b"USER anonymous\r\n", b"PORTX 1,2,3,4,5,6\r\n", b" PORT 10,0,0,2,1,1\r\n",
                                  b"PASV\r\n", b"\r\n", b"RETR PORT 10,0,0,2,1,1\r\n"])
def test_other_lines_are_not_hostport(line):
    assert ftp.parse_hostport(line) is None


@pytest.mark.parametrize(
    "line, out",
    [
        (b"PORT 10,0,0,2,195,80\r\n", b"PORT 203,0,113,1,195,81\r\n"),
        (b"port 10,0,0,2,195,80\n", b"port 203,0,113,1,195,81\n"),
        (b"EPRT |1|10.0.0.2|50000|\r\n", b"EPRT |1|203.0.113.1|50001|\r\n"),
        (b"EPRT !1!10.0.0.2!50000!\r\n", b"EPRT !1!203.0.113.1!50001!\r\n"),
    ],
)
def test_rewrite_keeps_verb_case_delimiter_and_line_end(line, out):
    hp = ftp.parse_hostport(line)
    assert hp is not None
    assert ftp.rewrite_line(line, hp, "203.0.113.1", 50001) == out


@given(st.binary(max_size=80))
def test_parse_never_raises_other_errors(data):
    for line in (data, b"PORT " + data, b"EPRT " + data, b"eprt " + data + b"\r\n"):
        with contextlib.suppress(ftp.ParseError):
            ftp.parse_hostport(line)


@given(st.ip_addresses(v=4), st.integers(1, 65535), st.sampled_from(["PORT", "EPRT"]))
def test_format_then_parse_roundtrips(ip, port, verb):
    seed = b"PORT 1,2,3,4,5,6\r\n" if verb == "PORT" else b"EPRT |1|1.2.3.4|56|\r\n"
    hp0 = ftp.parse_hostport(seed)
    assert hp0 is not None
    hp = ftp.parse_hostport(ftp.rewrite_line(seed, hp0, str(ip), port))
    assert hp is not None and (hp.addr, hp.port) == (str(ip), port)


@pytest.mark.parametrize(
    "line, code, final",
    [(b"226 Transfer complete.\r\n", 226, True), (b"150-Opening\r\n", 150, False), (b"200\r\n", 200, True),
     (b"421\n", 421, True)],
)
def test_reply(line, code, final):
    assert ftp.parse_reply(line) == ftp.Reply(code, final)


@pytest.mark.parametrize("line", [b" 226 indented\r\n", b"22 short\r\n", b"abc def\r\n", b"2260 x\r\n"])
def test_not_a_reply(line):
    assert ftp.parse_reply(line) is None


def test_command_verb():
    assert ftp.command_verb(b"retr file\r\n") == b"RETR"
    assert ftp.command_verb(b"\r\n") == b""
