"""Twisted's FTP server (Debian's ``python3-twisted``) for the lab: a real server that has
no EPSV and no EPRT (RFC 959 only: PORT and PASV; it answers ``502 Command 'EPSV' not
implemented``), the one an IPv6-only client cannot use without an RFC 6384 ALG.

    /usr/bin/python3 ftpalg/lab/twisted_ftp.py ADDR ROOT [PORT]

Run by path with the system's Python (where Debian installs Twisted; the lab's venv does
not have it), so it imports nothing of ftpalg. Listens on ``ADDR``:``PORT`` (IPv4) only.
Anonymous login ("anonymous" or "ftp", any password) to ``ROOT`` with write access (the
stock ``twist ftp`` gives anonymous users a read-only shell, and binds every address):
the lab's uploads go to ``ROOT/upload``. Passive data ports are ephemeral; active data
connections come from an ephemeral port (not 20) of ``ADDR`` (stock Twisted leaves the
source address to the kernel). Twisted connects for PORT at once and replies 200 only once
connected (425 if it could not); after PASV it reads no further command until the data
connection is made (or its 10 s timeout passes), so a PASV must be followed by a connection.
"""

from __future__ import annotations

import sys
from typing import Any


def main() -> None:
    from twisted.cred import checkers, portal
    from twisted.internet import reactor
    from twisted.protocols import ftp

    addr, root = sys.argv[1], sys.argv[2]
    port = int(sys.argv[3]) if len(sys.argv) > 3 else 21

    class Realm(ftp.BaseFTPRealm):  # type: ignore[misc]
        """Every avatar (anonymous only) gets a writable shell on the root."""

        def getHomeDirectory(self, avatarId: Any) -> Any:
            return self.anonymousRoot

        def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
            if ftp.IFTPShell not in interfaces:
                raise NotImplementedError(interfaces)
            shell = ftp.FTPShell(self.anonymousRoot)
            return ftp.IFTPShell, shell, getattr(shell, "logout", lambda: None)

    class LabFTP(ftp.FTP):  # type: ignore[misc]
        dtpFactory: Any = None  # as in ftp.FTP
        dtpPort: Any = None

        def ftp_USER(self, username: Any) -> Any:
            # "ftp" is the other usual anonymous name (the lab's other servers take both).
            if username in ("ftp", b"ftp"):
                username = self.factory.userAnonymous
            return super().ftp_USER(username)

        def ftp_PORT(self, address: Any) -> Any:
            """Twisted's PORT, its data connection bound to the server's own address: Twisted
            leaves the source to the kernel, which picks the interface's first address (the
            lab's vsftpd's), and a firewall pinhole for this server would not match it."""
            fields = tuple(map(int, address.split(",")))
            host = ".".join(str(f) for f in fields[:4])
            port = fields[4] << 8 | fields[5]
            if self.dtpFactory is not None:
                self.cleanupDTP()
            self.dtpFactory = ftp.DTPFactory(pi=self, peerHost=self.transport.getPeer().host)
            self.dtpFactory.setTimeout(self.dtpTimeout)
            self.dtpPort = reactor.connectTCP(host, port, self.dtpFactory, bindAddress=(addr, 0))

            def failed(err: Any) -> Any:
                err.trap(ftp.PortConnectionError)
                return ftp.CANT_OPEN_DATA_CNX

            return self.dtpFactory.deferred.addCallbacks(lambda _: ftp.ENTERING_PORT_MODE, failed)

    factory = ftp.FTPFactory(portal.Portal(Realm(root), [checkers.AllowAnonymousAccess()]))
    factory.protocol = LabFTP
    factory.allowAnonymous = True
    factory.userAnonymous = "anonymous"
    reactor.listenTCP(port, factory, interface=addr)
    reactor.run()


if __name__ == "__main__":
    main()
