"""FTP servers for the lab: configuration and the command that runs each in the foreground.

``server_command(kind, addr, root, state)`` writes one server instance's configuration into
``state`` (a directory of its own) and returns its argv; the lab runs it inside a namespace,
in its own process group, and kills that group to stop it. Every server listens on exactly
``addr``:``port`` (IPv4 or IPv6), allows anonymous login ("anonymous" or "ftp", any password),
serves every file under ``root`` and accepts uploads into ``root/upload``, which the lab
creates owned by ftp:ftp, mode 0755 (pyftpdlib, running as root, accepts them anywhere in
``root``). Every server keeps its default security, e.g. refuses PORT/EPRT to an address
that is not the client's. Config, log, pid and scoreboard files go to ``state``; nothing
else is written outside ``root``. Many instances may run at once, one address each.

The servers (``SERVER_KINDS``):

* vsftpd: the Debian package (``./dev.sh setup`` apt-installs it).
* proftpd and pure-ftpd: Debian's ``proftpd-core`` and ``pure-ftpd`` packages conflict with
  vsftpd (all provide ``ftp-server``), so ``./dev.sh setup`` only unpacks them
  (``apt-get download`` + ``dpkg-deb -x``) into ``.lab-pkgs/<package>/`` at the top of the
  repository (``PKG_DIR``); their shared libraries are apt-installed. A binary on ``PATH`` is
  used if the unpacked one is missing.
* pyftpdlib (PyPI), run as ``python -m ftpalg.lab.servers``: the one server that also speaks
  RFC 1639 LPRT and LPSV (reply 228), which no Debian server does.

Outside ``SERVER_KINDS``, ``NO_EPSV_KIND`` ("twisted"): Twisted's FTP server from Debian's
``python3-twisted``, run by ``SYSTEM_PYTHON`` (``twisted_ftp.py``), which has neither EPSV
nor EPRT: the NAT64 lab's server that only an RFC 6384 ALG makes usable over IPv6.

pure-ftpd takes the anonymous root from the home directory of the system user ``ftp``
(``/srv/ftp``, made by the vsftpd package) and writes its pid file and per-client scoreboard
to the compiled-in ``/var/run`` (= ``/run``). So each instance runs in a mount namespace of
its own (``unshare --mount --propagation private``) in which ``root`` is bind-mounted on
the ftp home directory and ``state`` on ``/run``: ``/run/pure-ftpd.pid``,
``/run/pure-ftpd/`` and the transfer log ``/run/transfer.log`` land in ``state``. The mounts
are private to that namespace: the host and the other instances do not see them, and they
vanish with the server's last process.

What works (tests/test_lab_servers.py): every server does PORT, EPRT, PASV and EPSV on
IPv4, and EPRT and EPSV on IPv6, where PORT is refused and PASV is refused (pure-ftpd) or
answered with an unusable 227 (the others). Only pyftpdlib does LPRT and LPSV (both
families). ``pasv_address`` changes 227 (and pyftpdlib's IPv4 228), never 229.

Caveats: vsftpd and pure-ftpd connect active data connections from port 20 of the server's
address; pure-ftpd's closed ones block vsftpd's bind() on that address for the TIME_WAIT
minute ("500 OOPS: vsf_sysutil_bind"), so do not share an address between those two.
vsftpd's session processes call setsid(): killing the process group leaves open sessions;
kill what is left in the namespace. proftpd's mod_delay makes each login take ~0.2 s.

``python -m ftpalg.lab.servers ADDR ROOT [PORT] [PASV_ADDRESS]`` runs the pyftpdlib server.
"""

from __future__ import annotations

import pwd
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

SERVER_KINDS: tuple[str, ...] = ("vsftpd", "proftpd", "pure-ftpd", "pyftpdlib")
NO_EPSV_KIND = "twisted"
"""A server kind outside SERVER_KINDS: Twisted's FTP server (``twisted_ftp``), RFC 959 only,
without EPSV and EPRT; the NAT64 lab (``nat64``) runs it. IPv4 only, no ``pasv_address``."""
SYSTEM_PYTHON = "/usr/bin/python3"
"""Debian's Python, where ``python3-twisted`` is installed (``./dev.sh setup``)."""

PKG_DIR = Path(__file__).resolve().parents[2] / ".lab-pkgs"
"""Where ``./dev.sh setup`` unpacks the Debian packages of proftpd and pure-ftpd."""

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

# Compiled-in modules only (Debian: mod_core, mod_xfer, mod_auth_unix, mod_auth, mod_ls,
# mod_log, mod_delay, mod_auth_pam, mod_ctrls, mod_lang, ...): no LoadModule, so nothing is
# read from the unpacked package but the binary. Every file it writes is named here (with
# --nodaemon the server log goes to stderr and SystemLog stays empty).
PROFTPD_CONF = """ServerType standalone
ServerName "ftpalg lab proftpd"
DefaultServer on
UseIPv6 on
DefaultAddress {addr}
SocketBindTight on
Port {port}
User nobody
Group nogroup
Umask 022
MaxInstances 500
UseReverseDNS off
WtmpLog off
AuthPAM off
AuthOrder mod_auth_unix.c
PidFile {state}/proftpd.pid
ScoreboardFile {state}/proftpd.scoreboard
DelayTable {state}/proftpd.delay
ControlsEngine off
ControlsSocket {state}/proftpd.sock
SystemLog {state}/proftpd.log
TransferLog {state}/xferlog
{masquerade}
<Anonymous {root}>
  User ftp
  Group ftp
  UserAlias anonymous ftp
  RequireValidShell off
  MaxClients 500
  <Directory *>
    <Limit WRITE>
      DenyAll
    </Limit>
  </Directory>
  <Directory upload>
    <Limit STOR STOU>
      AllowAll
    </Limit>
  </Directory>
</Anonymous>
"""

# unshare's shell: $1 = root, $2 = the ftp user's home, $3 = state, then pure-ftpd's argv.
PURE_FTPD_MOUNTS = 'mount --bind "$1" "$2" && mount --bind "$3" /run && shift 3 && exec "$@"'


def packaged_binary(package: str, name: str) -> str:
    """The server binary ``dev.sh`` unpacked from Debian ``package``, else one on PATH."""
    path = PKG_DIR / package / "usr" / "sbin" / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name}: neither {path} nor on PATH (run ./dev.sh setup)")
    return found


def server_command(kind: str, addr: str, root: Path, state: Path, port: int = 21,
                   pasv_address: str | None = None, extra_config: str = "") -> list[str]:
    """Write ``kind``'s configuration into ``state`` and return the argv that runs it in the
    foreground on ``addr``:``port`` (IPv4 or IPv6). ``pasv_address``: the address the server
    announces in 227 instead of its own (vsftpd ``pasv_address``, proftpd
    ``MasqueradeAddress``, pure-ftpd ``-P``, pyftpdlib ``masquerade_address``), for a server
    configured for the NAT in front of it. ``extra_config``: lines appended to vsftpd's
    configuration file (e.g. its TLS settings, see ``ftpalg.lab.tls``); vsftpd only."""
    if extra_config and kind != "vsftpd":
        raise ValueError(f"extra_config is for vsftpd only, not {kind!r}")
    state.mkdir(parents=True, exist_ok=True)
    v6 = ":" in addr
    if kind == "vsftpd":
        (state / "empty").mkdir(exist_ok=True)
        text = VSFTPD_CONF.format(listen4="NO" if v6 else "YES", listen6="YES" if v6 else "NO",
                                  v6="6" if v6 else "", addr=addr, port=port, root=root,
                                  empty=state / "empty", log=state / "vsftpd.log")
        if pasv_address:
            text += f"pasv_address={pasv_address}\n"
        if extra_config:
            text += extra_config.rstrip("\n") + "\n"
        conf = state / "vsftpd.conf"
        conf.write_text(text)
        conf.chmod(0o600)
        return ["vsftpd", str(conf)]
    if kind == "proftpd":
        masquerade = f"MasqueradeAddress {pasv_address}" if pasv_address else ""
        conf = state / "proftpd.conf"
        conf.write_text(PROFTPD_CONF.format(addr=addr, port=port, root=root, state=state,
                                            masquerade=masquerade))
        conf.chmod(0o600)
        return [packaged_binary("proftpd-core", "proftpd"), "--nodaemon", "--config", str(conf)]
    if kind == "pure-ftpd":
        home = pwd.getpwnam("ftp").pw_dir
        if not Path(home).is_dir():
            raise FileNotFoundError(f"pure-ftpd: the ftp user's home {home} does not exist")
        argv = [packaged_binary("pure-ftpd", "pure-ftpd"),
                "--bind", f"{addr},{port}",
                "--anonymousonly",
                "--dontresolve",
                "--syslogfacility", "none",
                "--altlog", "clf:/run/transfer.log",  # state/transfer.log, see the docstring
                "--maxclientsnumber", "500", "--maxclientsperip", "500"]
        if pasv_address:
            argv += ["--forcepassiveip", pasv_address]
        return ["unshare", "--mount", "--propagation", "private",
                "sh", "-c", PURE_FTPD_MOUNTS, "pure-ftpd-mounts", str(root), home, str(state), *argv]
    if kind == "pyftpdlib":
        argv = [sys.executable, "-m", "ftpalg.lab.servers", addr, str(root), str(port)]
        return argv + ([pasv_address] if pasv_address else [])
    if kind == NO_EPSV_KIND:
        if pasv_address or v6:
            raise ValueError("the twisted server takes an IPv4 address and no pasv_address")
        return [SYSTEM_PYTHON, str(Path(__file__).with_name("twisted_ftp.py")), addr, str(root), str(port)]
    raise ValueError(f"unknown server kind {kind!r}")


# ---- RFC 1639 LPRT / LPSV (pyftpdlib) -------------------------------------------------------

_LONG_ADDRESS = re.compile(r"\d{1,3}(,\d{1,3})*")


def parse_lprt(arg: str) -> tuple[int, str, int]:
    """``LPRT`` argument ``4,4,h1,..,h4,2,p1,p2`` or ``6,16,h1,..,h16,2,p1,p2`` ->
    (address family 4 or 6, address, port). ValueError if it is anything else."""
    if not _LONG_ADDRESS.fullmatch(arg):
        raise ValueError(f"not a long address: {arg!r}")
    fields = [int(f) for f in arg.split(",")]
    if any(f > 255 for f in fields) or len(fields) < 2:
        raise ValueError(f"not a long address: {arg!r}")
    af, hal = fields[0], fields[1]
    if (af, hal) not in ((4, 4), (6, 16)) or len(fields) != hal + 5 or fields[hal + 2] != 2:
        raise ValueError(f"not a long address: {arg!r}")
    host = bytes(fields[2:2 + hal])
    p1, p2 = fields[hal + 3:]
    return af, socket.inet_ntop(socket.AF_INET if af == 4 else socket.AF_INET6, host), p1 * 256 + p2


def lpsv_reply(addr: str, port: int) -> str:
    """The RFC 1639 reply to LPSV announcing ``addr``:``port``."""
    if addr.startswith("::ffff:") and "." in addr:
        addr = addr[7:]
    if ":" in addr:
        head, host = [6, 16], socket.inet_pton(socket.AF_INET6, addr)
    else:
        head, host = [4, 4], socket.inet_pton(socket.AF_INET, addr)
    fields = [*head, *host, 2, port >> 8, port & 0xFF]
    return f"228 Entering Long Passive Mode ({','.join(map(str, fields))})"


def lab_handler(root: str, masquerade: str | None = None) -> Any:
    """pyftpdlib's FTPHandler with anonymous access ("anonymous" or "ftp") to ``root``
    (upload anywhere in it), default security (no PORT to a foreign address or to a port
    below 1024), plus LPRT and LPSV."""
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler

    auth = DummyAuthorizer()
    auth.add_anonymous(root, perm="elrw")

    class LabHandler(FTPHandler):  # type: ignore[misc]
        proto_cmds = {
            **FTPHandler.proto_cmds,
            "LPRT": {"perm": None, "auth": True, "arg": True,
                     "help": "Syntax: LPRT <SP> af,hal,h1,...,pal,p1,p2 (long active mode)."},
            "LPSV": {"perm": None, "auth": True, "arg": False,
                     "help": "Syntax: LPSV (long passive mode)."},
        }
        authorizer = auth
        permit_foreign_addresses = False
        masquerade_address = masquerade
        _long_passive = False

        def ftp_USER(self, line: str) -> None:
            # "ftp" is the other usual anonymous name (vsftpd, proftpd and pure-ftpd take both).
            super().ftp_USER("anonymous" if line.lower() == "ftp" else line)

        def _family(self) -> int:
            local = self.socket.getsockname()[0]
            return 6 if ":" in local and not local.startswith("::ffff:") else 4

        def ftp_LPRT(self, line: str) -> None:
            if self._epsvall:
                self.respond("501 LPRT not allowed after EPSV ALL.")
                return
            try:
                af, ip, port = parse_lprt(line)
            except ValueError:
                self.respond("501 Invalid LPRT format.")
                return
            if af != self._family():
                self.respond(f"521 Supported address families are ({self._family()})")
                return
            self._make_eport(ip, port)  # refuses a foreign address or a port < 1024

        def ftp_LPSV(self, line: str) -> None:
            if self._epsvall:
                self.respond("501 LPSV not allowed after EPSV ALL.")
                return
            # PassiveDTP announces its port in a 229 reply; respond() turns that into 228.
            self._long_passive = True
            try:
                self._make_epasv(extmode=True)
            finally:
                self._long_passive = False

        def respond(self, resp: str, *args: Any, **kwargs: Any) -> None:
            if self._long_passive and resp.startswith("229 "):
                port = int(resp.split("|")[3])
                local = self.socket.getsockname()[0]
                announced = self.masquerade_address if self._family() == 4 and self.masquerade_address else local
                resp = lpsv_reply(announced, port)
            super().respond(resp, *args, **kwargs)

    return LabHandler


def main() -> None:
    from pyftpdlib.servers import ThreadedFTPServer

    addr, root = sys.argv[1], sys.argv[2]
    port = int(sys.argv[3]) if len(sys.argv) > 3 else 21
    handler = lab_handler(root, sys.argv[4] if len(sys.argv) > 4 else None)
    # One IOLoop per session: pyftpdlib 2.2.0 with one shared IOLoop sometimes drops a
    # live control connection when a finished active-mode session closes (it unregisters
    # the data socket's descriptor number after that number was reused; seen under
    # concurrent PORT sessions). Threads keep each session's descriptors apart.
    server = ThreadedFTPServer((addr, port), handler)
    server.max_cons = 512
    server.serve_forever()


if __name__ == "__main__":
    main()
