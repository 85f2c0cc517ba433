"""FTP servers for the lab: configuration and the command that runs each in the foreground.

``server_command(kind, addr, root, state)`` writes one server instance's configuration into
``state`` (a directory of its own) and returns its argv; the lab runs it inside a namespace.
Every server allows anonymous login, reads ``root`` and accepts uploads into ``root/upload``.

``python -m ftpalg.lab.servers ADDR ROOT [PORT]`` runs the pyftpdlib server (default security:
PORT to a foreign address is refused).
"""

from __future__ import annotations

import sys
from pathlib import Path

SERVER_KINDS: tuple[str, ...] = ("vsftpd", "pyftpdlib")

VSFTPD_CONF = """listen={listen4}
listen_ipv6={listen6}
listen_address{v6}={addr}
listen_port={port}
background=NO
anonymous_enable=YES
local_enable=NO
no_anon_password=YES
anon_root={root}
write_enable=YES
anon_upload_enable=YES
anon_umask=022
port_enable=YES
pasv_enable=YES
connect_from_port_20=YES
seccomp_sandbox=NO
secure_chroot_dir={empty}
xferlog_enable=NO
syslog_enable=NO
vsftpd_log_file={log}
max_clients=500
max_per_ip=500
"""


def server_command(kind: str, addr: str, root: Path, state: Path, port: int = 21,
                   pasv_address: str | None = None) -> list[str]:
    """Write ``kind``'s configuration into ``state`` and return the argv that runs it in the
    foreground on ``addr``:``port`` (IPv4 or IPv6). ``pasv_address``: the address the server
    announces in 227 instead of its own (vsftpd ``pasv_address``, proftpd
    ``MasqueradeAddress``), for a server configured for the NAT in front of it."""
    state.mkdir(parents=True, exist_ok=True)
    v6 = ":" in addr
    if kind == "vsftpd":
        (state / "empty").mkdir(exist_ok=True)
        text = VSFTPD_CONF.format(listen4="NO" if v6 else "YES", listen6="YES" if v6 else "NO",
                                  v6="_ipv6" if v6 else "", addr=addr, port=port, root=root,
                                  empty=state / "empty", log=state / "vsftpd.log")
        if pasv_address:
            text += f"pasv_address={pasv_address}\n"
        conf = state / "vsftpd.conf"
        conf.write_text(text)
        conf.chmod(0o600)
        return ["vsftpd", str(conf)]
    if kind == "pyftpdlib":
        argv = [sys.executable, "-m", "ftpalg.lab.servers", addr, str(root), str(port)]
        return argv + ([pasv_address] if pasv_address else [])
    raise ValueError(f"unknown server kind {kind!r}")


def main() -> None:
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import FTPServer

    addr, root = sys.argv[1], sys.argv[2]
    port = int(sys.argv[3]) if len(sys.argv) > 3 else 21
    auth = DummyAuthorizer()
    auth.add_anonymous(root, perm="elrw")
    attrs: dict[str, object] = {"authorizer": auth, "permit_foreign_addresses": False}
    if len(sys.argv) > 4:
        attrs["masquerade_address"] = sys.argv[4]
    handler = type("LabHandler", (FTPHandler,), attrs)
    server = FTPServer((addr, port), handler)
    server.max_cons = 512
    server.serve_forever()


if __name__ == "__main__":
    main()
