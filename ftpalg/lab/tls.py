"""FTPS (explicit TLS, RFC 4217) for the lab: a vsftpd that accepts ``AUTH TLS``/``AUTH SSL``.

``start_tls_server(lab)`` starts vsftpd with ``ssl_enable=YES`` on ``TLS_SERVER``:21 in the
"internet" namespace ``<p>-s``, next to the lab's plain servers: an address of its own on
``s0`` (port 21, as explicit FTPS uses, so ``ftpalg run`` sees its control connections),
reached by the inside clients through gw1's MASQUERADE. The configuration is the lab's
usual vsftpd one (``servers.server_command``: anonymous, ``lab.files`` as root, uploads into
``upload/``) plus ``VSFTPD_TLS``: TLS allowed, not required (a client that never sends AUTH
gets plain FTP), anonymous sessions may use it, no TLS session reuse is demanded on data
connections (Python's ftplib does not reuse sessions; lftp with GnuTLS not always).

``start_dnat_tls_server(lab)`` starts one behind gw2 instead (``INSIDE_TLS_SERVER``, public
``PUBLIC_TLS_SERVER``), configured the way ftpalg's FTPS warning tells an admin to (it cannot
read an encrypted 227/229): ``pasv_address`` set to the public address, a fixed passive range
``PASV_RANGE``, and gw2 forwarding port 21 and, optionally, that range (an address on gw2's
``go`` plus a DNAT and a FORWARD rule, removed again by ``stop()``).

The certificate is self-signed, made with ``openssl`` (Debian package ``openssl``; not
installed by ``dev.sh`` explicitly: ``TlsUnavailable`` says so if it is missing) into
``<lab state>/tls/``; clients must not verify it (curl ``-k``, lftp ``set
ssl:verify-certificate no``, ``ssl.CERT_NONE``).

Everything it makes goes with ``TlsServer.stop()`` or with the lab's ``down()``: the server
runs as one of ``lab.procs`` (its session processes, which vsftpd puts in sessions of their
own, are found by their command line and killed), the added address is removed (or goes with
the namespace), the files live under the lab's state directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import servers
from .lab import GW2_NET, INSIDE_NET, PUBLIC_NET, Lab, LabError, run, stop_processes

TLS_SERVER = f"{PUBLIC_NET}.7"
"""Outside FTPS server (vsftpd with TLS), in <p>-s on s0, port 21; no other server uses it."""
TLS_PORT = 21
INSIDE_TLS_SERVER = f"{INSIDE_NET}.7"
"""Inside FTPS server (``start_dnat_tls_server``), in <p>-i on i0, behind gw2."""
PUBLIC_TLS_SERVER = f"{GW2_NET}.7"
"""Its public address at gw2 (DNAT of port 21 and, if asked, of its passive range)."""
PASV_RANGE = (40100, 40109)
"""The inside FTPS server's passive ports (in the lab's FIXED_PORTS, below the ephemeral range)."""

VSFTPD_TLS = """ssl_enable=YES
allow_anon_ssl=YES
force_anon_logins_ssl=NO
force_anon_data_ssl=NO
force_local_logins_ssl=NO
force_local_data_ssl=NO
rsa_cert_file={cert}
rsa_private_key_file={key}
require_ssl_reuse=NO
require_cert=NO
ssl_ciphers=HIGH
ssl_sslv2=NO
ssl_sslv3=NO
ssl_tlsv1=YES
"""
# vsftpd 3.0.3's default ssl_ciphers is DES-CBC3-SHA, which OpenSSL 3 no longer offers: the
# handshake would fail. ssl_tlsv1=YES allows TLS 1.0 and up (1.2 and 1.3 are negotiated).


class TlsUnavailable(LabError):
    """Something FTPS in the lab needs is missing (openssl, vsftpd)."""


def openssl_binary() -> str:
    found = shutil.which("openssl")
    if found is None:
        raise TlsUnavailable("openssl is not installed: `apt-get install openssl` (dev.sh does not install it "
                             "explicitly; add it to APT_PACKAGES)")
    return found


def make_certificate(directory: Path, name: str, days: int = 2) -> tuple[Path, Path]:
    """A self-signed certificate for ``name`` (an IP address: CN and subjectAltName) and its
    unencrypted RSA key, made once into ``directory``; (cert, key) paths. The key is 0600."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    if cert.is_file() and key.is_file():
        return cert, key
    directory.mkdir(parents=True, exist_ok=True)
    san = f"IP:{name}" if name.replace(".", "").isdigit() or ":" in name else f"DNS:{name}"
    run([openssl_binary(), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days),
         "-subj", f"/CN={name}", "-addext", f"subjectAltName={san}",
         "-keyout", str(key), "-out", str(cert)], timeout=30)
    key.chmod(0o600)
    return cert, key


def _has_address(ns: str, addr: str) -> bool:
    out = run(["ip", "-n", ns, "-o", "addr", "show"]).stdout
    return any(f" {addr}/" in line for line in out.splitlines())


@dataclass
class TlsServer:
    """A running FTPS vsftpd of a lab (``start_tls_server``)."""

    lab: Lab
    ns: str
    addr: str
    port: int
    state: Path
    proc: subprocess.Popen[bytes]
    cert: Path
    added: tuple[str, str] | None  # (address/len, device) added for it, removed by stop()
    undo: list[list[str]] = field(default_factory=list)  # commands stop() runs (last first)

    @property
    def conf(self) -> Path:
        return self.state / "vsftpd.conf"

    @property
    def log(self) -> Path:
        """vsftpd's output (its "500 OOPS" lines) and, in ``vsftpd.log`` next to it, its log."""
        return self.state / "server.out"

    def session_pids(self) -> list[int]:
        """The processes of this server in its namespace: the listener and the sessions that
        vsftpd moved to sessions of their own (the same command line)."""
        out = run(["ip", "netns", "pids", self.ns], check=False).stdout.split()
        want = str(self.conf).encode()
        pids = []
        for pid in out:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if want in cmdline.split(b"\0"):
                pids.append(int(pid))
        return pids

    def stop(self) -> None:
        """Stop the server and its sessions, remove the address added for it and its files."""
        stop_processes([self.proc])
        if self.proc in self.lab.procs:
            self.lab.procs.remove(self.proc)
        for pid in self.session_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.added is not None and self.ns in self.lab.leftovers():
            run(["ip", "-n", self.ns, "addr", "del", self.added[0], "dev", self.added[1]], check=False)
        while self.undo:
            run(self.undo.pop(), check=False)
        shutil.rmtree(self.state, ignore_errors=True)


def start_tls_server(lab: Lab, ns: str | None = None, addr: str = TLS_SERVER, port: int = TLS_PORT,
                     dev: str = "s0", prefix_len: int = 24, pasv_address: str | None = None,
                     extra_config: str = "", timeout: float = 10.0) -> TlsServer:
    """Start an FTPS vsftpd on ``addr``:``port`` in ``ns`` (the lab's "internet" namespace by
    default), adding ``addr``/``prefix_len`` to ``dev`` there if the namespace lacks it; wait
    until it listens. ``pasv_address``, ``extra_config``: as ``servers.server_command``'s
    (vsftpd lines after the TLS ones). The lab's ``down()`` stops it too."""
    if shutil.which("vsftpd") is None:
        raise TlsUnavailable("vsftpd is not installed (./dev.sh setup)")
    ns = lab.server if ns is None else ns
    base = lab.state / "tls"
    cert, key = make_certificate(base / "certs", addr)
    state = base / f"vsftpd-{addr}-{port}"
    shutil.rmtree(state, ignore_errors=True)
    added = None
    if not _has_address(ns, addr):
        added = (f"{addr}/{prefix_len}", dev)
        run(["ip", "-n", ns, "addr", "add", added[0], "dev", dev, *(["nodad"] if ":" in addr else [])])
    try:
        argv = servers.server_command("vsftpd", addr, lab.files, state, port, pasv_address,
                                      extra_config=VSFTPD_TLS.format(cert=cert, key=key) + extra_config)
        proc = lab.popen(ns, argv, state / "server.out", stdin_log=True)
    except BaseException:
        if added is not None:
            run(["ip", "-n", ns, "addr", "del", added[0], "dev", dev], check=False)
        raise
    server = TlsServer(lab, ns, addr, port, state, proc, cert, added)
    try:
        lab.wait_ports({ns: [(addr, port)]}, timeout, watch=[proc])
    except BaseException as e:
        out = server.log.read_text(errors="replace")[-2000:] if server.log.exists() else ""
        server.stop()
        if isinstance(e, LabError):
            raise LabError(f"FTPS vsftpd on {addr}:{port} did not start: {e}\n{out}") from None
        raise
    return server


@contextlib.contextmanager
def tls_server(lab: Lab, ns: str | None = None, addr: str = TLS_SERVER, port: int = TLS_PORT,
               dev: str = "s0") -> Iterator[TlsServer]:
    """``start_tls_server`` for a ``with`` block: stopped (and cleaned up) at its end."""
    server = start_tls_server(lab, ns, addr, port, dev)
    try:
        yield server
    finally:
        server.stop()


def gw2_forwarding(lab: Lab, ports: str) -> tuple[list[list[str]], list[list[str]]]:
    """The commands that make ``PUBLIC_TLS_SERVER`` a public address of gw2 forwarding tcp
    ``ports`` (iptables multiport syntax, e.g. "21,40100:40109") to ``INSIDE_TLS_SERVER``, as
    an admin would, and the commands that undo them."""
    ns = ["ip", "netns", "exec", lab.gw2]
    dnat = ["PREROUTING", "-t", "nat", "-d", f"{PUBLIC_TLS_SERVER}/32", "-i", "go", "-p", "tcp", "-m", "multiport",
            "--dports", ports, "-j", "DNAT", "--to-destination", INSIDE_TLS_SERVER]
    # gw2's FORWARD accepts DNATed port 21 already; the other forwarded ports need a rule
    fwd = ["FORWARD", "-d", f"{INSIDE_TLS_SERVER}/32", "-i", "go", "-o", "gi", "-p", "tcp", "-m", "multiport",
           "--dports", ports, "-m", "conntrack", "--ctstate", "DNAT", "-j", "ACCEPT"]
    do = [["ip", "-n", lab.gw2, "addr", "add", f"{PUBLIC_TLS_SERVER}/32", "dev", "go"],
          [*ns, "iptables", "-A", *dnat], [*ns, "iptables", "-A", *fwd]]
    undo = [["ip", "-n", lab.gw2, "addr", "del", f"{PUBLIC_TLS_SERVER}/32", "dev", "go"],
            [*ns, "iptables", "-D", *dnat], [*ns, "iptables", "-D", *fwd]]
    return do, undo


def start_dnat_tls_server(lab: Lab, forward_passive: bool = True) -> TlsServer:
    """An FTPS vsftpd on ``INSIDE_TLS_SERVER``:21 behind gw2, configured as ftpalg's warning
    tells the admin of a NATed FTPS server: ``pasv_address`` = ``PUBLIC_TLS_SERVER`` and a
    fixed passive range ``PASV_RANGE``. gw2 forwards port 21 of ``PUBLIC_TLS_SERVER`` and,
    if ``forward_passive``, that range too. ``stop()`` removes the address and the rules."""
    lo, hi = PASV_RANGE
    server = start_tls_server(lab, lab.inside, INSIDE_TLS_SERVER, dev="i0", pasv_address=PUBLIC_TLS_SERVER,
                              extra_config=f"pasv_min_port={lo}\npasv_max_port={hi}\n")
    do, undo = gw2_forwarding(lab, f"21,{lo}:{hi}" if forward_passive else "21")
    try:
        for argv, back in zip(do, undo, strict=True):
            run(argv)
            server.undo.append(back)
    except BaseException:
        server.stop()
        raise
    return server
