"""Python ftplib client for the lab, in every data-connection mode, over IPv4 or IPv6:

    python -m ftpalg.lab.ftpclient HOST (get NAME OUT | put FILE NAME)
        [--mode PORT|EPRT|LPRT|PASV|EPSV|LPSV] [--eprt] [--data-port N] [--port N]
        [--source ADDR] [--timeout S]

Modes (default PORT; ``--eprt`` is ``--mode EPRT``):

* PORT (RFC 959, IPv4 only), EPRT (RFC 2428) and LPRT (RFC 1639, ``4,4,...`` or
  ``6,16,...``): active; the client listens on its control connection's local address
  (port ``--data-port``, default any) and announces it with that command.
* PASV (IPv4 only): the client connects to the address AND port of the 227 reply, even when
  the address is not the server's (``trust_server_pasv_ipv4_address``), as old clients do.
* EPSV: to the control connection's peer, at the port of the 229 reply.
* LPSV (RFC 1639): to the address and port of the 228 reply, parsed here.

Every mode is strict: the client sends that command only, never falls back to another; a
refusal fails the transfer. LPRT and LPSV go out as raw commands (ftplib has neither).
``--timeout`` bounds every connect and every read (control and data). Exit 0 on success; on
failure the reason (e.g. the server's reply) is printed on stderr.
"""

from __future__ import annotations

import argparse
import ftplib
import ipaddress
import re
import socket
import sys

MODES = ("PORT", "EPRT", "LPRT", "PASV", "EPSV", "LPSV")
ACTIVE_MODES = ("PORT", "EPRT", "LPRT")
PASSIVE_MODES = ("PASV", "EPSV", "LPSV")

_NUMBERS = re.compile(r"\d+(?:\s*,\s*\d+)+")


def long_address(host: str, port: int) -> str:
    """RFC 1639 host-port argument of LPRT (and body of a 228 reply):
    ``4,4,h1,h2,h3,h4,2,p1,p2`` or ``6,16,h1,...,h16,2,p1,p2``."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    head = [4, 4] if ip.version == 4 else [6, 16]
    return ",".join(str(n) for n in [*head, *ip.packed, 2, port >> 8, port & 0xFF])


def parse228(resp: str) -> tuple[str, int]:
    """(address, port) announced by an RFC 1639 LPSV reply, e.g.
    ``228 Entering Long Passive Mode (4,4,192,0,2,2,2,195,80)``."""
    if not resp.startswith("228"):
        raise ftplib.error_reply(resp)
    m = _NUMBERS.search(resp[3:])
    if m is None:
        raise ftplib.error_proto(resp)
    fields = [int(f) for f in m.group(0).replace(" ", "").split(",")]
    if len(fields) < 2:
        raise ftplib.error_proto(resp)
    af, hal = fields[0], fields[1]
    if ((af, hal) not in ((4, 4), (6, 16)) or len(fields) != hal + 5 or fields[hal + 2] != 2
            or any(f > 255 for f in fields)):
        raise ftplib.error_proto(resp)
    family = socket.AF_INET if af == 4 else socket.AF_INET6
    host = socket.inet_ntop(family, bytes(fields[2:2 + hal]))
    return host, fields[hal + 3] * 256 + fields[hal + 4]


class LabFTP(ftplib.FTP):
    """ftplib.FTP that opens every data connection in ``mode`` (one of MODES), and only so.

    Active modes listen on ``data_port`` (0: any) of the control connection's local address."""

    def __init__(self, mode: str = "PORT", data_port: int = 0, timeout: float = 20.0) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}, not one of {MODES}")
        super().__init__(timeout=timeout)
        self.mode = mode
        self.passiveserver = mode in PASSIVE_MODES
        self.trust_server_pasv_ipv4_address = True  # PASV: use the 227 address
        self.data_port = data_port

    def set_pasv(self, val: bool | int) -> None:
        """Accepted when it agrees with the mode (old callers say ``set_pasv(False)``)."""
        if bool(val) != (self.mode in PASSIVE_MODES):
            raise ValueError(f"set_pasv({val}) contradicts mode {self.mode}")

    def _check_family(self) -> None:
        if self.mode in ("PORT", "PASV") and self.af != socket.AF_INET:
            other = "EPRT or LPRT" if self.mode == "PORT" else "EPSV or LPSV"
            raise ValueError(f"{self.mode} carries IPv4 addresses only; use {other}")

    def makeport(self) -> socket.socket:
        assert self.sock is not None
        self._check_family()
        host = self.sock.getsockname()[0]
        sock = socket.socket(self.af, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, self.data_port))
            sock.listen(1)
            port = sock.getsockname()[1]
            if self.mode == "PORT":
                self.sendport(host, port)
            elif self.mode == "EPRT":
                self.sendeprt(host, port)
            else:
                self.voidcmd(f"LPRT {long_address(host, port)}")
        except BaseException:
            sock.close()
            raise
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        return sock

    def makepasv(self) -> tuple[str, int]:
        assert self.sock is not None
        self._check_family()
        if self.mode == "PASV":
            return ftplib.parse227(self.sendcmd("PASV"))  # address from the reply, trusted
        if self.mode == "EPSV":
            return ftplib.parse229(self.sendcmd("EPSV"), self.sock.getpeername())
        return parse228(self.sendcmd("LPSV"))


class ActiveFTP(LabFTP):
    """LabFTP in active mode: EPRT (``eprt``) or PORT. Kept for its existing callers."""

    def __init__(self, eprt: bool, data_port: int, timeout: float) -> None:
        super().__init__("EPRT" if eprt else "PORT", data_port, timeout)
        self.eprt = eprt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ftpalg.lab.ftpclient")
    ap.add_argument("host", help="server address, IPv4 or IPv6")
    ap.add_argument("op", choices=["get", "put"])
    ap.add_argument("a", help="get: remote name; put: local file")
    ap.add_argument("b", help="get: local file; put: remote name")
    ap.add_argument("--mode", choices=MODES, help="data-connection command (default PORT)")
    ap.add_argument("--eprt", action="store_true", help="same as --mode EPRT")
    ap.add_argument("--data-port", type=int, default=0, help="active modes: local port to listen on")
    ap.add_argument("--port", type=int, default=21, help="control port of the server")
    ap.add_argument("--timeout", type=float, default=15.0, help="seconds, for every connect and read")
    ap.add_argument("--source", default="", help="local address to connect from")
    args = ap.parse_args(argv)
    if args.eprt and args.mode not in (None, "EPRT"):
        ap.error(f"--eprt contradicts --mode {args.mode}")
    mode = args.mode or ("EPRT" if args.eprt else "PORT")
    ftp = LabFTP(mode, args.data_port, args.timeout)
    try:
        ftp.connect(args.host, args.port, source_address=(args.source, 0) if args.source else None)
        ftp.login()
        if args.op == "get":
            with open(args.b, "wb") as f:
                ftp.retrbinary(f"RETR {args.a}", f.write)
        else:
            with open(args.a, "rb") as f:
                ftp.storbinary(f"STOR {args.b}", f)
        ftp.quit()
    except (ftplib.Error, OSError, EOFError, ValueError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        ftp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
