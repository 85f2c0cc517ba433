"""Python ftplib client for the lab, active mode only:

    python -m ftpalg.lab.ftpclient HOST (get NAME OUT | put FILE NAME) [--eprt] [--data-port N] [--port N]

Exit 0 on success; on failure the server's reply is printed on stderr.
"""

from __future__ import annotations

import argparse
import ftplib
import socket
import sys


class ActiveFTP(ftplib.FTP):
    """ftplib.FTP that announces its data port with EPRT (``eprt``) or PORT, optionally
    from a fixed local port."""

    def __init__(self, eprt: bool, data_port: int, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self.passiveserver = False  # active mode, whatever the caller forgets
        self.eprt = eprt
        self.data_port = data_port

    def makeport(self) -> socket.socket:
        assert self.sock is not None
        host = self.sock.getsockname()[0]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, self.data_port))
        sock.listen(1)
        port = sock.getsockname()[1]
        if self.eprt:
            self.sendeprt(host, port)
        else:
            self.sendport(host, port)
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        return sock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ftpalg.lab.ftpclient")
    ap.add_argument("host")
    ap.add_argument("op", choices=["get", "put"])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--eprt", action="store_true")
    ap.add_argument("--data-port", type=int, default=0)
    ap.add_argument("--port", type=int, default=21, help="control port of the server")
    ap.add_argument("--timeout", type=float, default=15.0)
    ap.add_argument("--source", default="", help="local address to connect from")
    args = ap.parse_args(argv)
    ftp = ActiveFTP(args.eprt, args.data_port, args.timeout)
    try:
        ftp.connect(args.host, args.port, source_address=(args.source, 0) if args.source else None)
        ftp.login()
        ftp.set_pasv(False)
        if args.op == "get":
            with open(args.b, "wb") as f:
                ftp.retrbinary(f"RETR {args.a}", f.write)
        else:
            with open(args.a, "rb") as f:
                ftp.storbinary(f"STOR {args.b}", f)
        ftp.quit()
    except (ftplib.Error, OSError, EOFError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
