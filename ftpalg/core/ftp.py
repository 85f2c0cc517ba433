"""Grammar of the FTP lines that carry a data-connection address.

Pure functions over one line (bytes, terminator included or not). Parsing returns the span
of exactly the text a rewrite replaces, so a rewrite keeps the verb's case, the server's
text, the spacing, the parentheses and the line ending exactly as the peer sent them.

Commands (client -> server), parsed by ``parse_hostport``:
- RFC 959 §4.1.2 ``PORT h1,h2,h3,h4,p1,p2``: port = p1*256 + p2.
- RFC 2428 §2 ``EPRT <d><af><d><addr><d><port><d>``: d is any ASCII 33..126 that is not a
  digit (``|`` is usual); af 1 = IPv4 dotted quad, af 2 = IPv6 text form.
- RFC 1639 §2 ``LPRT af,hal,h1,...,pal,p1,p2``: af 4 with hal 4 (IPv4), af 6 with hal 16
  (IPv6); pal 2; every number a byte.
Passive replies (server -> client), parsed one line at a time by ``parse_passive_reply``:
- RFC 959 §4.2 ``227 ... (h1,h2,h3,h4,p1,p2)``. RFC 1123 §4.1.2.6: the parentheses are not
  mandated (RFC 959 Figure 3 omits them; ``227 =h1,...,p2`` exists), so the text is scanned
  for the first run of six comma-separated numbers.
- RFC 1639 §3 ``228 ... (af,hal,h1,...,pal,p1,p2)``, scanned the same way.
- RFC 2428 §3 ``229 ... (<d><d><d><port><d>)``: no address, only the port.
Replies, RFC 959 §4.2: ``NNN text`` ends a reply, ``NNN-text`` opens a multi-line reply that
ends at the first line starting ``NNN ``; the lines between may start with anything.
Verbs are case-insensitive (RFC 959 §5.3); lines end in CRLF, but bare LF is accepted.

Any input either parses or raises ``ParseError`` (a ``ValueError``); nothing else.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from enum import Enum


class Form(Enum):
    """Where an address travels. Commands are named by their verb, replies by their code
    (the member name is the command the reply answers)."""

    PORT = "PORT"  # RFC 959 §4.1.2
    EPRT = "EPRT"  # RFC 2428 §2
    LPRT = "LPRT"  # RFC 1639 §2
    PASV = "227"  # RFC 959 §4.2, RFC 1123 §4.1.2.6
    EPSV = "229"  # RFC 2428 §3
    LPSV = "228"  # RFC 1639 §3

    @property
    def is_reply(self) -> bool:
        return self in _REPLY_FORMS


_REPLY_FORMS = frozenset({Form.PASV, Form.EPSV, Form.LPSV})
COMMAND_VERBS = {b"PORT": Form.PORT, b"EPRT": Form.EPRT, b"LPRT": Form.LPRT}
PASSIVE_REPLY_CODES = {227: Form.PASV, 228: Form.LPSV, 229: Form.EPSV}


class ParseError(ValueError):
    """A line that names an address-carrying verb or reply but whose argument is malformed."""


@dataclass(frozen=True, slots=True)
class HostPort:
    """An address-carrying command or reply.

    ``addr`` is the textual IP address as ``ipaddress`` normalises it (None for 229, which
    carries none); ``family`` is 4 or 6 (0 for 229: the control connection's family
    applies); ``span`` is the byte range of the line that ``rewrite_line`` replaces.
    """

    form: Form
    addr: str | None
    port: int  # 1..65535
    family: int  # 4, 6, or 0 for 229
    span: tuple[int, int]
    delim: str = "|"  # EPRT / 229 delimiter


# RFC 959 §5.3: the verb starts the line (no leading space) and is followed by SP; a longer
# word ("PORTX") is another verb.
_VERB = re.compile(rb"(?i)(PORT|EPRT|LPRT)(?![A-Za-z0-9])")
_SPACES = re.compile(rb" +")
_PORT_ARG = re.compile(rb"(\d{1,3}) *, *(\d{1,3}) *, *(\d{1,3}) *, *(\d{1,3}) *, *(\d{1,3}) *, *(\d{1,3})")
# A comma-separated run of numbers; maximal, because \d+ and the repetition are greedy.
_NUM_RUN = re.compile(rb"\d+(?: *, *\d+)*")
_COMMA = re.compile(rb" *, *")
# RFC 2428 §2/§3 delimiter: ASCII 33..126 except the digits.
_DELIM = rb"[\x21-\x2f\x3a-\x7e]"
_EPSV_ARG = re.compile(rb"\((" + _DELIM + rb")\1\1(\d+)\1\)")

# RFC 1639 §2: address family -> host address length. The port length is always 2.
_LONG_AF_HAL = {4: 4, 6: 16}
_LONG_PAL = 2


def command_verb(line: bytes) -> bytes:
    """The upper-cased first word of a command line, at most 8 bytes (b'' for none)."""
    if line[:1].isalpha():  # the usual case: only the first 9 bytes can matter, split only them
        return line[:9].split(None, 1)[0][:8].upper()
    word = line.split(None, 1)[0] if line.strip() else b""
    return word[:8].upper()


def _arg_end(line: bytes, start: int) -> int:
    """Offset where the argument starting at ``start`` ends: before the line terminator
    (CRLF, bare LF or none) and any spaces preceding it."""
    end = len(line)
    if line.endswith(b"\n"):
        end -= 2 if line.endswith(b"\r\n") else 1
    while end > start and line[end - 1] == 0x20:
        end -= 1
    return end


def _port(hi: int, lo: int, what: str) -> int:
    port = hi * 256 + lo
    if port == 0:
        raise ParseError(f"{what} names port 0")
    return port


def _bytes_or_error(nums: list[int], what: str) -> None:
    if any(n > 255 for n in nums):
        raise ParseError(f"{what} number above 255")


def _ipv4(nums: list[int]) -> str:
    """Four numbers 0..255 (checked by the caller) as ipaddress would write them."""
    return f"{nums[0]}.{nums[1]}.{nums[2]}.{nums[3]}"


def _long_hostport(nums: list[int], what: str) -> tuple[str, int, int]:
    """RFC 1639 §2 ``af,hal,h1,...,pal,p1,p2`` -> (addr, port, family)."""
    if len(nums) < 3:
        raise ParseError(f"{what} argument is not af,hal,h1,...,pal,p1,p2")
    af, hal = nums[0], nums[1]
    if _LONG_AF_HAL.get(af) != hal:
        raise ParseError(f"{what} address family {af} with address length {hal}")
    if len(nums) < 3 + hal or nums[2 + hal] != _LONG_PAL:
        raise ParseError(f"{what} port length is not {_LONG_PAL}")
    if len(nums) != 3 + hal + _LONG_PAL:
        raise ParseError(f"{what} has {len(nums)} numbers, not {3 + hal + _LONG_PAL}")
    _bytes_or_error(nums, what)
    host = bytes(nums[2 : 2 + hal])
    ip = ipaddress.IPv4Address(host) if af == 4 else ipaddress.IPv6Address(host)
    return str(ip), _port(nums[-2], nums[-1], what), af


def parse_hostport(line: bytes) -> HostPort | None:
    """Parse a PORT/EPRT/LPRT command line. None if the line is another command; ParseError
    if the verb is one of those but its argument is missing or not valid."""
    m = _VERB.match(line)
    if m is None:
        return None
    verb = m.group(1).upper()
    sp = _SPACES.match(line, m.end())
    if sp is None:
        raise ParseError(f"{verb.decode()} without an argument")
    start = sp.end()
    end = _arg_end(line, start)

    if verb == b"PORT":  # RFC 959 §4.1.2: h1,h2,h3,h4,p1,p2
        a = _PORT_ARG.fullmatch(line, start, end)
        if a is None:
            raise ParseError("PORT argument is not h1,h2,h3,h4,p1,p2")
        nums = [int(x) for x in a.groups()]
        _bytes_or_error(nums, "PORT")
        return HostPort(Form.PORT, _ipv4(nums[:4]), _port(nums[4], nums[5], "PORT"), 4, (start, end))

    if verb == b"LPRT":  # RFC 1639 §2: af,hal,h1,...,pal,p1,p2
        r = _NUM_RUN.fullmatch(line, start, end)
        if r is None:
            raise ParseError("LPRT argument is not a list of numbers")
        parts = _COMMA.split(r.group())
        if any(len(p) > 3 for p in parts):
            raise ParseError("LPRT number above 255")
        addr, port, family = _long_hostport([int(p) for p in parts], "LPRT")
        return HostPort(Form.LPRT, addr, port, family, (start, end))

    # RFC 2428 §2: EPRT <d><af><d><addr><d><port><d>
    body = line[start:end]
    if len(body) < 7:
        raise ParseError("EPRT argument too short")
    d = body[0:1]
    if not 33 <= d[0] <= 126 or d.isdigit():
        raise ParseError("EPRT delimiter not allowed")
    parts = body.split(d)
    # "|1|a.b.c.d|port|" splits into ['', '1', 'a.b.c.d', 'port', '']
    if len(parts) != 5 or parts[0] or parts[4]:
        raise ParseError("EPRT argument is not <d>af<d>addr<d>port<d>")
    af, host, portb = parts[1], parts[2], parts[3]
    if af not in (b"1", b"2"):
        raise ParseError("EPRT address family not 1 or 2")
    if not portb.isdigit() or len(portb) > 5 or not 0 < int(portb) <= 65535:
        raise ParseError("EPRT port not in 1..65535")
    try:
        text = host.decode("ascii")
        ip = ipaddress.IPv4Address(text) if af == b"1" else ipaddress.IPv6Address(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise ParseError(f"EPRT address invalid for family {af.decode()}") from e
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ParseError("EPRT address carries a scope id")  # meaningless to the peer
    return HostPort(Form.EPRT, str(ip), int(portb), ip.version, (start, end), d.decode())


def _reply_text_start(line: bytes, code: int) -> int:
    """Where the text of a reply line starts: after ``NNN `` / ``NNN-`` on a line that opens
    or ends the reply, at 0 on a continuation line (RFC 959 §4.2)."""
    if len(line) >= 4 and line[:3] == b"%03d" % code and line[3:4] in (b" ", b"-"):
        return 4
    return 0


def _number_runs(line: bytes, pos: int) -> list[tuple[re.Match[bytes], list[bytes]]]:
    return [(r, _COMMA.split(r.group())) for r in _NUM_RUN.finditer(line, pos)]


def parse_passive_reply(line: bytes, code: int) -> HostPort | None:
    """Parse one line of a 227/228/229 reply (the first line or a continuation line).

    None if the line carries no address text (``227 Logout.``) or ``code`` is not a passive
    reply code; ParseError if the numbers are there but invalid. The span covers only the
    numbers (227, 228) or the text inside the parentheses (229)."""
    form = PASSIVE_REPLY_CODES.get(code)
    if form is None:
        return None
    pos = _reply_text_start(line, code)

    if form is Form.EPSV:  # RFC 2428 §3: (<d><d><d><tcp-port><d>)
        m = _EPSV_ARG.search(line, pos)
        if m is None:
            return None
        digits = m.group(2)
        if len(digits) > 5 or not 0 < int(digits) <= 65535:
            raise ParseError("229 port not in 1..65535")
        return HostPort(Form.EPSV, None, int(digits), 0, (m.start() + 1, m.end() - 1), m.group(1).decode())

    # RFC 1123 §4.1.2.6: scan for the numbers wherever they are. A run is the maximal list of
    # comma-separated numbers; one whose numbers have more than 3 digits is not an address.
    for r, parts in _number_runs(line, pos):
        if any(len(p) > 3 for p in parts):
            continue
        nums = [int(p) for p in parts]
        if form is Form.PASV:  # RFC 959 §4.2: h1,h2,h3,h4,p1,p2
            if len(nums) != 6:
                continue
            _bytes_or_error(nums, "227")
            return HostPort(Form.PASV, _ipv4(nums[:4]), _port(nums[4], nums[5], "227"), 4, r.span())
        # RFC 1639 §3: af,hal,h1,...,pal,p1,p2; runs of one or two numbers are just text.
        if len(nums) < 3:
            continue
        addr, port, family = _long_hostport(nums, "228")
        return HostPort(Form.LPSV, addr, port, family, r.span())
    return None


def _ip(addr: str | None, form: Form) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if addr is None:
        raise ValueError(f"{form.value} needs an address")
    return ipaddress.ip_address(addr)


def format_hostport(hp: HostPort, addr: str | None, port: int) -> bytes:
    """The replacement text for ``hp.span`` naming ``addr``:``port`` in ``hp``'s form.

    PORT/227 take an IPv4 address; EPRT/LPRT/228 either family; 229 only the port (``addr``
    is ignored). Raises ValueError for an address or port the form cannot carry."""
    if not 0 < port <= 65535:
        raise ValueError(f"port {port} not in 1..65535")
    p1, p2 = port >> 8, port & 0xFF
    d = hp.delim
    if hp.form is Form.EPSV:  # RFC 2428 §3
        return f"{d}{d}{d}{port}{d}".encode()
    if hp.form in (Form.PORT, Form.PASV):  # RFC 959 §4.1.2 / §4.2
        if addr is None:
            raise ValueError(f"{hp.form.value} needs an address")
        try:  # the usual case, once per session: inet_pton is strict and ~20x cheaper than ipaddress
            packed = socket.inet_pton(socket.AF_INET, addr)
        except OSError:
            raise ValueError(f"{hp.form.value} carries only IPv4 addresses, not {addr!r}") from None
        return ",".join(str(n) for n in (*packed, p1, p2)).encode()
    ip = _ip(addr, hp.form)
    if hp.form is Form.EPRT:  # RFC 2428 §2
        return f"{d}{1 if ip.version == 4 else 2}{d}{ip}{d}{port}{d}".encode()
    # LPRT / 228, RFC 1639 §2-3
    return ",".join(str(n) for n in (ip.version, len(ip.packed), *ip.packed, _LONG_PAL, p1, p2)).encode()


def rewrite_line(line: bytes, hp: HostPort, addr: str | None, port: int) -> bytes:
    """``line`` with the text at ``hp.span`` replaced by ``addr``:``port``; everything else
    stays byte for byte."""
    s, e = hp.span
    return line[:s] + format_hostport(hp, addr, port) + line[e:]


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    final: bool  # True for "NNN " (ends a reply), False for "NNN-" (opens a multi-line one)


def parse_reply(line: bytes) -> Reply | None:
    """The reply code at the start of ``line``, or None if it does not start a reply."""
    if len(line) >= 4 and line[:3].isdigit() and line[3:4] in (b" ", b"-", b"\r", b"\n"):
        return Reply(int(line[:3]), line[3:4] != b"-")
    if len(line) == 3 and line.isdigit():
        return Reply(int(line), True)
    return None


# ---- NAT64 (RFC 6384): the lines a translator's ALG writes itself ---------------------------
def line_end(line: bytes) -> bytes:
    """The terminator of ``line`` as the peer wrote it: CRLF, bare LF, or none."""
    if line.endswith(b"\r\n"):
        return b"\r\n"
    return b"\n" if line.endswith(b"\n") else b""


def argument(line: bytes) -> bytes:
    """A command's argument: the text after the verb and its spaces, without the line end
    and trailing spaces (b"" for none)."""
    parts = line.rstrip(b"\r\n ").split(None, 1)
    return parts[1].strip() if len(parts) > 1 else b""


def port_command(addr: str, port: int, end: bytes) -> bytes:
    """``PORT h1,h2,h3,h4,p1,p2`` naming an IPv4 ``addr``:``port`` (RFC 959 §4.1.2)."""
    return b"PORT " + format_hostport(HostPort(Form.PORT, addr, port, 4, (0, 0)), addr, port) + end


def passive_reply(form: Form, port: int, addr: str | None, end: bytes) -> bytes:
    """The reply to an EPSV (229, RFC 2428 §3) or an LPSV (228, RFC 1639 §3, naming ``addr``)
    for a data connection at ``port``."""
    if form is Form.EPSV:
        return b"229 Entering Extended Passive Mode (|||%d|)" % port + end
    hp = HostPort(Form.LPSV, addr, port, 6, (0, 0))
    return b"228 Entering Long Passive Mode (" + format_hostport(hp, addr, port) + b")" + end
