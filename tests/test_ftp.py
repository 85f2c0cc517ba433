import contextlib
import ipaddress

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


# ---- more command forms: PORT/EPRT edge cases, LPRT (RFC 1639 §2) ---------------------------------

@pytest.mark.parametrize(
    "line, addr",
    [
        (b"EPRT |2|fd00:0000:0000:0000:0000:0000:0000:0002|6446|\r\n", "fd00::2"),  # full form
        (b"EPRT |2|FD00:0:0::2|6446|\r\n", "fd00::2"),  # upper case, partly compressed
        (b"EPRT |2|2001:db8::1:0:0:1|6446|\n", "2001:db8::1:0:0:1"),
        (b"EPRT |2|::1|6446|\r\n", "::1"),
        (b"EPRT #2#fd00::2#6446#\r\n", "fd00::2"),
    ],
)
def test_eprt_ipv6_is_normalised(line, addr):
    hp = ftp.parse_hostport(line)
    assert hp is not None and (hp.form, hp.addr, hp.port, hp.family) == (Form.EPRT, addr, 6446, 6)
    assert line[hp.span[0]:hp.span[1]].endswith(b"6446" + hp.delim.encode())


@pytest.mark.parametrize(
    "line, addr, port, family",
    [
        (b"LPRT 4,4,10,0,0,2,2,195,80\r\n", "10.0.0.2", 50000, 4),
        (b"lprt 4, 4, 10, 0, 0, 2, 2, 4, 1\n", "10.0.0.2", 1025, 4),
        (b"LPRT 6,16,253,0,0,0,0,0,0,0,0,0,0,0,0,0,0,2,2,25,46\r\n", "fd00::2", 6446, 6),
        (b"LPRT 6,16,32,1,13,184,0,0,0,0,0,0,0,0,0,0,0,1,2,255,255\r\n", "2001:db8::1", 65535, 6),
        (b"LPRT 4,4,10,0,0,2,2,195,80\r\n", "10.0.0.2", 50000, 4),
    ],
)
def test_lprt_parses(line, addr, port, family):
    hp = ftp.parse_hostport(line)
    assert hp is not None and (hp.form, hp.addr, hp.port, hp.family) == (Form.LPRT, addr, port, family)
    assert line[hp.span[0]:hp.span[1]].rstrip(b"\r\n") == line[5:].rstrip(b"\r\n")


@pytest.mark.parametrize(
    "line",
    [
        b"LPRT 4,16,10,0,0,2,2,195,80\r\n",  # hal does not fit af 4
        b"LPRT 6,4,10,0,0,2,2,195,80\r\n",  # hal does not fit af 6
        b"LPRT 5,4,10,0,0,2,2,195,80\r\n",  # unknown af
        b"LPRT 4,4,10,0,0,2,3,0,195,80\r\n",  # pal 3
        b"LPRT 4,4,10,0,0,2,1,80\r\n",  # pal 1
        b"LPRT 4,4,10,0,0,2,2,195\r\n",  # one port byte missing
        b"LPRT 4,4,10,0,0,2,2,195,80,1\r\n",  # one number too many
        b"LPRT 4,4,10,0,0\r\n",  # truncated before pal
        b"LPRT 4,4,10,0,0,256,2,195,80\r\n",  # above 255
        b"LPRT 4,4,10,0,0,2,2,0,0\r\n",  # port 0
        b"LPRT 4,4,10,0,0,0002,2,195,80\r\n",  # four digits
        b"LPRT 6,16,253,0,0,2,2,25,46\r\n",  # too few address bytes for af 6
        b"LPRT 4,4,10,0,0,2,2,195,80,\r\n",
        b"LPRT 4\r\n",
        b"LPRT |1|10.0.0.2|50000|\r\n",
    ],
)
def test_lprt_malformed_raises(line):
    with pytest.raises(ftp.ParseError):
        ftp.parse_hostport(line)


@pytest.mark.parametrize(
    "line",
    [
        b"PORT\r\n",  # verb without argument
        b"EPRT \r\n",
        b"LPRT\n",
        b"PORT\t10,0,0,2,1,1\r\n",  # RFC 959 wants SP
        b"EPRT |2|fe80::1%eth0|6446|\r\n",  # scope id means nothing to the peer
        b"EPRT |2|10.0.0.2|6446|\r\n",  # family mismatch the other way
        b"EPRT |1|010.0.0.2|6446|\r\n",  # leading zeros are ambiguous (octal?)
        b"PORT 10,0,0,2,1,1\r\n\r\n",  # not one line
    ],
)
def test_more_malformed_commands_raise(line):
    with pytest.raises(ftp.ParseError):
        ftp.parse_hostport(line)


@pytest.mark.parametrize("line", [b"LPSV\r\n", b"EPSV\r\n", b"LPRTS 4,4\r\n", b"lprt2 4,4,10,0,0,2,2,1,1\r\n"])
def test_more_other_lines_are_not_hostport(line):
    assert ftp.parse_hostport(line) is None


def test_command_without_terminator_and_trailing_spaces():
    hp = ftp.parse_hostport(b"PORT 10,0,0,2,1,1")
    assert hp is not None and hp.span == (5, 17)
    line = b"EPRT |1|10.0.0.2|50000|  \r\n"
    hp = ftp.parse_hostport(line)
    assert hp is not None and line[hp.span[0]:hp.span[1]] == b"|1|10.0.0.2|50000|"
    assert ftp.rewrite_line(line, hp, "203.0.113.1", 1) == b"EPRT |1|203.0.113.1|1|  \r\n"


@pytest.mark.parametrize(
    "line, addr, port, out",
    [
        (b"LPRT 4,4,10,0,0,2,2,195,80\r\n", "203.0.113.1", 50001, b"LPRT 4,4,203,0,113,1,2,195,81\r\n"),
        (b"lprt 4, 4, 10, 0, 0, 2, 2, 195, 80\n", "203.0.113.1", 50001, b"lprt 4,4,203,0,113,1,2,195,81\n"),
        (b"LPRT 4,4,10,0,0,2,2,195,80\r\n", "2001:db8::1", 1,
         b"LPRT 6,16,32,1,13,184,0,0,0,0,0,0,0,0,0,0,0,1,2,0,1\r\n"),
        (b"EPRT |2|fd00::2|6446|\r\n", "2001:db8::1", 6447, b"EPRT |2|2001:db8::1|6447|\r\n"),
        (b"EPRT |1|10.0.0.2|6446|\r\n", "2001:0db8:0::1", 6447, b"EPRT |2|2001:db8::1|6447|\r\n"),
    ],
)
def test_rewrite_long_and_ipv6_forms(line, addr, port, out):
    hp = ftp.parse_hostport(line)
    assert hp is not None
    assert ftp.rewrite_line(line, hp, addr, port) == out


# ---- passive replies: 227 (RFC 959 §4.2, RFC 1123 §4.1.2.6), 228 (RFC 1639 §3), 229 (RFC 2428 §3) ------

def _span_text(line: bytes, hp: ftp.HostPort) -> bytes:
    return line[hp.span[0]:hp.span[1]]


@pytest.mark.parametrize(
    "line, numbers",
    [
        (b"227 Entering Passive Mode (10,1,0,2,195,149).\r\n", b"10,1,0,2,195,149"),
        (b"227 Entering Passive Mode (10,1,0,2,195,149)\n", b"10,1,0,2,195,149"),  # bare LF
        (b"227 Entering Passive Mode 10,1,0,2,195,149\r\n", b"10,1,0,2,195,149"),  # RFC 959 Figure 3
        (b"227 =10,1,0,2,195,149\r\n", b"10,1,0,2,195,149"),
        (b"227 Entering Passive Mode (10, 1, 0, 2, 195, 149)\r\n", b"10, 1, 0, 2, 195, 149"),
        (b"227 Entering Passive Mode (10 ,1 , 0,2,  195,149)\r\n", b"10 ,1 , 0,2,  195,149"),
        (b"227 Entering Passive Mode (10,1,0,2,195,149). Have fun, 2 clients max.\r\n", b"10,1,0,2,195,149"),
        (b"227 Passive mode 2 on (10,1,0,2,195,149)\r\n", b"10,1,0,2,195,149"),  # a lone number is text
        (b"227 ok (010,001,000,002,195,149)\r\n", b"010,001,000,002,195,149"),
        (b"227-Entering Passive Mode (10,1,0,2,195,149)\r\n", b"10,1,0,2,195,149"),  # opens a multi-line reply
        (b"227 Entering Passive Mode (10,1,0,2,195,149)", b"10,1,0,2,195,149"),  # no terminator
    ],
)
def test_227_parses(line, numbers):
    hp = ftp.parse_passive_reply(line, 227)
    assert hp is not None
    assert (hp.form, hp.addr, hp.port, hp.family) == (Form.PASV, "10.1.0.2", 195 * 256 + 149, 4)
    assert _span_text(line, hp) == numbers


@pytest.mark.parametrize(
    "line, out",
    [
        (b"227 Entering Passive Mode (10,1,0,2,195,149).\r\n", b"227 Entering Passive Mode (203,0,113,1,4,1).\r\n"),
        (b"227 =10,1,0,2,195,149\n", b"227 =203,0,113,1,4,1\n"),
        (b"227 Entering Passive Mode (10, 1, 0, 2, 195, 149) ok\r\n",
         b"227 Entering Passive Mode (203,0,113,1,4,1) ok\r\n"),
        (b"227 Entering Passive Mode 10,1,0,2,195,149\r\n", b"227 Entering Passive Mode 203,0,113,1,4,1\r\n"),
    ],
)
def test_227_rewrite_keeps_server_text(line, out):
    hp = ftp.parse_passive_reply(line, 227)
    assert hp is not None
    assert ftp.rewrite_line(line, hp, "203.0.113.1", 1025) == out


def test_227_multi_line_reply_address_on_continuation_line():
    lines = [
        b"227-Entering Passive Mode, the address is on the next line\r\n",
        b" 10,1,0,2,195,149\r\n",
        b"227 Have a nice day\r\n",
    ]
    parsed = [ftp.parse_passive_reply(line, 227) for line in lines]
    assert parsed[0] is None and parsed[2] is None
    hp = parsed[1]
    assert hp is not None and (hp.addr, hp.port) == ("10.1.0.2", 50069)
    assert ftp.rewrite_line(lines[1], hp, "203.0.113.1", 1025) == b" 203,0,113,1,4,1\r\n"
    # a continuation line may even start with what looks like the code
    hp = ftp.parse_passive_reply(b"227 (10,1,0,2,195,149)\r\n", 227)
    assert hp is not None and hp.span == (5, 21)


@pytest.mark.parametrize(
    "line",
    [
        b"227 Logout.\r\n",
        b"227\r\n",
        b"227 \r\n",
        b"227-Welcome to server 2.0.1\r\n",
        b"   served 12,345 files today\r\n",  # too few numbers
        b"227 Entering Passive Mode (1000,1,0,2,195,149)\r\n",  # a run of 4 digits is not a byte
        b"227 Entering Passive Mode (10,1,0,2,195,1490)\r\n",
        b"227 Entering Passive Mode (10,1,0,2,195,149,7)\r\n",  # seven numbers are not h1..p2
        b"227 Entering Passive Mode (10.1.0.2:50069)\r\n",
        b"",
    ],
)
def test_227_without_address(line):
    assert ftp.parse_passive_reply(line, 227) is None


@pytest.mark.parametrize(
    "line",
    [
        b"227 Entering Passive Mode (10,1,0,256,195,149)\r\n",
        b"227 Entering Passive Mode (10,1,0,2,999,149)\r\n",
        b"227 Entering Passive Mode (10,1,0,2,0,0)\r\n",  # port 0
        b"227 =300,1,0,2,195,149 then (10,1,0,2,195,149)\r\n",  # the first six numbers are the address
    ],
)
def test_227_invalid_numbers_raise(line):
    with pytest.raises(ftp.ParseError):
        ftp.parse_passive_reply(line, 227)


@pytest.mark.parametrize(
    "line, port, delim",
    [
        (b"229 Entering Extended Passive Mode (|||6446|)\r\n", 6446, "|"),
        (b"229 Entering Extended Passive Mode (!!!6446!)\r\n", 6446, "!"),
        (b"229 Entering Extended Passive Mode (~~~1~)\n", 1, "~"),
        (b"229 ok ((((65535()\r\n", 65535, "("),
        (b"229-EPSV (|||6446|)\r\n", 6446, "|"),
        (b"229 2 ways: (|||6446|).\r\n", 6446, "|"),
    ],
)
def test_229_parses(line, port, delim):
    hp = ftp.parse_passive_reply(line, 229)
    assert hp is not None
    assert (hp.form, hp.addr, hp.port, hp.family, hp.delim) == (Form.EPSV, None, port, 0, delim)
    assert _span_text(line, hp) == f"{delim * 3}{port}{delim}".encode()
    out = ftp.rewrite_line(line, hp, None, 40001)
    assert out == line.replace(f"{delim * 3}{port}{delim}".encode(), f"{delim * 3}40001{delim}".encode())


@pytest.mark.parametrize(
    "line",
    [
        b"229 bye\r\n",
        b"229 Entering Extended Passive Mode\r\n",
        b"229 Entering Extended Passive Mode (|||)\r\n",
        b"229 Entering Extended Passive Mode (|!|6446|)\r\n",  # delimiters differ
        b"229 Entering Extended Passive Mode (111644461)\r\n",  # a digit is no delimiter
        b"229 Entering Extended Passive Mode (|1|10.0.0.2|6446|)\r\n",  # EPRT syntax, not EPSV's
        b"229 Entering Extended Passive Mode (   6446 )\r\n",  # space is not allowed (33..126)
        b"229 Entering Extended Passive Mode |||6446|\r\n",  # the parentheses are part of the syntax
    ],
)
def test_229_without_port(line):
    assert ftp.parse_passive_reply(line, 229) is None


@pytest.mark.parametrize(
    "line",
    [
        b"229 Entering Extended Passive Mode (|||0|)\r\n",
        b"229 Entering Extended Passive Mode (|||65536|)\r\n",
        b"229 Entering Extended Passive Mode (|||123456|)\r\n",
        b"229 Entering Extended Passive Mode (|||" + b"9" * 5000 + b"|)\r\n",  # int() has a digit limit
    ],
)
def test_229_invalid_port_raises(line):
    with pytest.raises(ftp.ParseError):
        ftp.parse_passive_reply(line, 229)


V6_BYTES = b"253,0,0,0,0,0,0,0,0,0,0,0,0,0,0,2"


@pytest.mark.parametrize(
    "line, addr, port, family, numbers",
    [
        (b"228 Entering Long Passive Mode (4,4,10,1,0,2,2,195,149)\r\n", "10.1.0.2", 50069, 4,
         b"4,4,10,1,0,2,2,195,149"),
        (b"228 Entering Long Passive Mode (6,16," + V6_BYTES + b",2,25,46)\r\n", "fd00::2", 6446, 6,
         b"6,16," + V6_BYTES + b",2,25,46"),
        (b"228 Long Passive Mode v2 = 4, 4, 10, 1, 0, 2, 2, 195, 149\n", "10.1.0.2", 50069, 4,
         b"4, 4, 10, 1, 0, 2, 2, 195, 149"),
        (b"228-Entering Long Passive Mode (4,4,10,1,0,2,2,195,149)\r\n", "10.1.0.2", 50069, 4,
         b"4,4,10,1,0,2,2,195,149"),
        (b"  (4,4,10,1,0,2,2,195,149)\r\n", "10.1.0.2", 50069, 4, b"4,4,10,1,0,2,2,195,149"),
    ],
)
def test_228_parses(line, addr, port, family, numbers):
    hp = ftp.parse_passive_reply(line, 228)
    assert hp is not None and (hp.form, hp.addr, hp.port, hp.family) == (Form.LPSV, addr, port, family)
    assert _span_text(line, hp) == numbers


def test_228_rewrite():
    line = b"228 Entering Long Passive Mode (4,4,10,1,0,2,2,195,149)\r\n"
    hp = ftp.parse_passive_reply(line, 228)
    assert hp is not None
    assert ftp.rewrite_line(line, hp, "203.0.113.1", 1025) == \
        b"228 Entering Long Passive Mode (4,4,203,0,113,1,2,4,1)\r\n"
    assert ftp.rewrite_line(line, hp, "fd00::2", 6446) == \
        b"228 Entering Long Passive Mode (6,16," + V6_BYTES + b",2,25,46)\r\n"


@pytest.mark.parametrize(
    "line",
    [b"228 Logout.\r\n", b"228 Long Passive Mode 1,2 now\r\n", b"228 (4,4,10,1,0,2000,2,195,149)\r\n"],
)
def test_228_without_address(line):
    assert ftp.parse_passive_reply(line, 228) is None


@pytest.mark.parametrize(
    "line",
    [
        b"228 Entering Long Passive Mode (4,16,10,1,0,2,2,195,149)\r\n",  # wrong hal
        b"228 Entering Long Passive Mode (6,4,10,1,0,2,2,195,149)\r\n",
        b"228 Entering Long Passive Mode (4,4,10,1,0,2,3,0,195,149)\r\n",  # wrong pal
        b"228 Entering Long Passive Mode (4,4,10,1,0,2,2,195)\r\n",  # too short
        b"228 Entering Long Passive Mode (4,4,10,1,0,256,2,195,149)\r\n",  # above 255
        b"228 Entering Long Passive Mode (4,4,10,1,0,2,2,0,0)\r\n",  # port 0
        b"228 Entering Long Passive Mode (6,16,253,0,0,2,2,25,46)\r\n",
    ],
)
def test_228_invalid_raises(line):
    with pytest.raises(ftp.ParseError):
        ftp.parse_passive_reply(line, 228)


def test_reply_codes_and_forms():
    assert ftp.PASSIVE_REPLY_CODES == {227: Form.PASV, 228: Form.LPSV, 229: Form.EPSV}
    assert all(form.is_reply and form.value == str(code) for code, form in ftp.PASSIVE_REPLY_CODES.items())
    assert not any(f.is_reply for f in (Form.PORT, Form.EPRT, Form.LPRT))
    assert ftp.parse_passive_reply(b"226 (10,1,0,2,195,149)\r\n", 226) is None
    # the code given decides the grammar, not the digits the line starts with
    assert ftp.parse_passive_reply(b"229 (|||6446|)\r\n", 227) is None


def test_format_rejects_what_a_form_cannot_carry():
    port_hp = ftp.parse_hostport(b"PORT 10,0,0,2,1,1\r\n")
    pasv_hp = ftp.parse_passive_reply(b"227 (10,1,0,2,195,149)\r\n", 227)
    epsv_hp = ftp.parse_passive_reply(b"229 (|||6446|)\r\n", 229)
    assert port_hp is not None and pasv_hp is not None and epsv_hp is not None
    for hp in (port_hp, pasv_hp):
        with pytest.raises(ValueError):
            ftp.format_hostport(hp, "fd00::2", 1)
        with pytest.raises(ValueError):
            ftp.format_hostport(hp, None, 1)
    for bad_port in (0, 65536):
        with pytest.raises(ValueError):
            ftp.format_hostport(port_hp, "10.0.0.2", bad_port)
    assert ftp.format_hostport(epsv_hp, "10.0.0.2", 7) == b"|||7|"  # 229 has no address to change


# ---- properties -------------------------------------------------------------------------------

PREFIXES = [b"", b"PORT ", b"EPRT ", b"LPRT ", b"lprt ", b"227 ", b"227-", b"228 ", b"229 ", b" "]


@given(st.sampled_from(PREFIXES), st.binary(max_size=120), st.sampled_from([b"", b"\r\n", b"\n"]))
def test_any_bytes_parse_or_raise_parse_error(prefix, data, end):
    _parse_every_way(prefix + data + end)


def _parse_every_way(line: bytes) -> None:
    """Each parser returns None or a HostPort, or raises ParseError; nothing else."""
    results = []
    with contextlib.suppress(ftp.ParseError):
        results.append(ftp.parse_hostport(line))
    for code in (227, 228, 229):
        with contextlib.suppress(ftp.ParseError):
            results.append(ftp.parse_passive_reply(line, code))
    for hp in results:
        if hp is not None:
            _check_self_rewrite(line, hp)


def _check_self_rewrite(line: bytes, hp: ftp.HostPort) -> None:
    """Writing back what was parsed gives a line that parses to the same address and port."""
    new = ftp.rewrite_line(line, hp, hp.addr, hp.port)
    again = ftp.parse_passive_reply(new, int(hp.form.value)) if hp.form.is_reply else ftp.parse_hostport(new)
    assert again is not None and (again.form, again.addr, again.port) == (hp.form, hp.addr, hp.port)


# Text near the grammar, to reach the deeper branches: token soup, number lists (right or
# wrong length, bytes or not), EPRT- and 229-shaped arguments with random parts.
_num = st.integers(0, 255).map(lambda n: str(n).encode()) | st.sampled_from([b"256", b"0004", b"65536", b""])
_delim = st.sampled_from([b"|", b"!", b"(", b"1", b" ", b"\xff"])
_soup = st.lists(_num | st.sampled_from([b",", b", ", b" ,", b"(", b")", b"|", b"!", b" ", b"=", b"."]),
                 max_size=40).map(b"".join)
_numlist = st.builds(lambda nums, sep, pre, post: pre + sep.join(nums) + post,
                     st.sampled_from([1, 5, 6, 7, 9, 21]).flatmap(lambda n: st.lists(_num, min_size=n, max_size=n))
                     | st.sampled_from([[b"4", b"4"], [b"6", b"16"]]).flatmap(
                         lambda h: st.lists(_num, min_size=1, max_size=22).map(lambda t: h + t)),
                     st.sampled_from([b",", b", ", b" , "]), st.sampled_from([b"", b"(", b"="]),
                     st.sampled_from([b"", b")", b")."]))
_eprt = st.builds(lambda d, af, host, port: d + af + d + host + d + port + d, _delim,
                  st.sampled_from([b"1", b"2", b"3", b""]),
                  st.sampled_from([b"10.0.0.2", b"fd00::2", b"fe80::1%eth0", b"1.2.3", b"::ffff:1.2.3.4", b""]), _num)
_epsv = st.builds(lambda d, port, close: b"(" + d * 3 + port + d + close, _delim, _num, st.sampled_from([b")", b""]))
_near = _soup | _numlist | _eprt | _epsv


@given(st.sampled_from(PREFIXES), _near)
def test_near_grammar_text_parses_or_raises_parse_error(prefix, data):
    _parse_every_way(prefix + data + b"\r\n")


_text = st.text(st.characters(min_codepoint=32, max_codepoint=126, blacklist_characters="0123456789,"),
                max_size=20).map(str.encode)


def _addr_for(form: Form, ip4, ip6, use6: bool) -> str | None:
    if form is Form.EPSV:
        return None
    if form in (Form.PORT, Form.PASV) or not use6:
        return str(ip4)
    return str(ip6)


@given(st.sampled_from(list(Form)), st.ip_addresses(v=4), st.ip_addresses(v=6), st.booleans(),
       st.integers(1, 65535), _text, _text, st.sampled_from([b"\r\n", b"\n"]))
def test_format_parse_roundtrip_every_form(form, ip4, ip6, use6, port, before, after, end):
    seeds = {
        Form.PORT: b"PORT 1,2,3,4,5,6",
        Form.EPRT: b"eprt !1!1.2.3.4!56!",
        Form.LPRT: b"LPRT 4,4,1,2,3,4,2,5,6",
        Form.PASV: b"227 " + before + b"(1,2,3,4,5,6)" + after,
        Form.LPSV: b"228 " + before + b"(6,16,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,2,5,6)" + after,
        Form.EPSV: b"229 " + before + b"(|||56|)" + after,
    }
    line = seeds[form] + end
    hp0 = ftp.parse_passive_reply(line, int(form.value)) if form.is_reply else ftp.parse_hostport(line)
    assert hp0 is not None and hp0.form is form
    addr = _addr_for(form, ip4, ip6, use6)
    new = ftp.rewrite_line(line, hp0, addr, port)
    s, e = hp0.span
    text = ftp.format_hostport(hp0, addr, port)
    assert new[:s] == line[:s] and new[s + len(text):] == line[e:]  # all but the span kept byte for byte
    hp = ftp.parse_passive_reply(new, int(form.value)) if form.is_reply else ftp.parse_hostport(new)
    assert hp is not None and (hp.form, hp.addr, hp.port, hp.span) == (form, addr, port, (s, s + len(text)))
    if addr is not None:
        assert hp.family == ipaddress.ip_address(addr).version
