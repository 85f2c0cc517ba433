"""Grammar of the FTP lines that carry a data-connection address.

Pure functions over one line (bytes, terminator included). Parsing returns the span of the
address argument so a rewrite replaces only that span and keeps the verb's case, the spacing
and the line ending exactly as the peer sent them.

Forms (client -> server):
- RFC 959 §4.1.2 ``PORT h1,h2,h3,h4,p1,p2``: port = p1*256 + p2.
- RFC 2428 §2 ``EPRT <d><af><d><addr><d><port><d>``: d is any ASCII 33..126 that is not a
  digit (``|`` is usual); af 1 = IPv4 dotted quad, af 2 = IPv6 text form.
Replies (server -> client), RFC 959 §4.2: ``NNN text`` ends a reply, ``NNN-text`` opens a
multi-line reply that ends at the first line starting ``NNN ``.
Verbs are case-insensitive (RFC 959 §5.3); lines end in CRLF, but bare LF is accepted.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import Enum


class Form(Enum):
    PORT = "PORT"
    EPRT = "EPRT"


class ParseError(ValueError):
    """A line that names an address-carrying verb but whose argument is malformed."""


@dataclass(frozen=True, slots=True)
class HostPort:
    """An address-carrying command: ``addr`` is the textual IP address."""

    form: Form
    addr: str
    port: int
    family: int  # 4 or 6
    span: tuple[int, int]  # byte offsets of the argument inside the line
    delim: str = "|"  # EPRT delimiter


# Leading spaces are not allowed by RFC 959; the verb must be followed by SP.
_VERB = re.compile(rb"(?i)(PORT|EPRT) +")
_PORT_ARG = re.compile(rb" *(\d{1,3}) *, *(\d{1,3}) *, *(\d{1,3}) *, *(\d{1,3}) *, *(\d{1,3}) *, *(\d{1,3})")
_EOL = re.compile(rb" *\r?\n\Z")


def command_verb(line: bytes) -> bytes:
    """The upper-cased first word of a command line (b'' for none)."""
    word = line.split(None, 1)[0] if line.strip() else b""
    return word[:8].upper()


def parse_hostport(line: bytes) -> HostPort | None:
    """Parse a PORT/EPRT line. None if the line is another command; ParseError if the
    verb is PORT/EPRT but its argument is not valid."""
    m = _VERB.match(line)
    if m is None:
        return None
    verb = m.group(1).upper()
    start = m.end()
    if verb == b"PORT":
        a = _PORT_ARG.match(line, start)
        if a is None or _EOL.match(line, a.end()) is None:
            raise ParseError("PORT argument is not h1,h2,h3,h4,p1,p2")
        nums = [int(x) for x in a.groups()]
        if any(n > 255 for n in nums):
            raise ParseError("PORT number above 255")
        port = nums[4] * 256 + nums[5]
        if port == 0:
            raise ParseError("PORT names port 0")
        addr = ".".join(str(n) for n in nums[:4])
        return HostPort(Form.PORT, addr, port, 4, (a.start(), a.end()))
    # EPRT
    end = line.find(b"\n", start)
    body = line[start:end].rstrip(b"\r ")
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
    return HostPort(Form.EPRT, str(ip), int(portb), ip.version, (start, start + len(body)), d.decode())


def format_hostport(hp: HostPort, addr: str, port: int) -> bytes:
    """The argument text for ``hp``'s form naming ``addr``:``port``."""
    if hp.form is Form.PORT:
        h = addr.split(".")
        return f"{h[0]},{h[1]},{h[2]},{h[3]},{port >> 8},{port & 0xFF}".encode()
    af = 1 if ipaddress.ip_address(addr).version == 4 else 2
    d = hp.delim
    return f"{d}{af}{d}{addr}{d}{port}{d}".encode()


def rewrite_line(line: bytes, hp: HostPort, addr: str, port: int) -> bytes:
    """``line`` with the argument of ``hp`` replaced by ``addr``:``port``."""
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
