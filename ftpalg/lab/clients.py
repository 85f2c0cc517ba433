"""Every real FTP client the lab drives, in every data-connection mode it really supports.

``ClientKind(name, mode)`` builds the argv that downloads (``argv``) or uploads
(``upload_argv``) one file with client ``name`` in ``mode`` (one of ``MODES``), over IPv4 or
IPv6 (``families``), optionally from a given ``source`` address. Every argv is bounded
(``TIMEOUT`` seconds for a connect or a stalled connection, so a broken data connection
fails instead of hanging), ignores the user's configuration files and proxy variables (but
tnftp's ``ftp_proxy``) and exits 0 only if the transfer succeeded. ``CLIENT_KINDS`` lists
every supported (client, mode) pair; ``kinds()`` filters it.

What each client does, found by experiment (curl 7.88.1, lftp 4.9.2, GNU Wget 1.21.3,
tnftp 20210827, Debian 12; the commands seen in captures on the server's side, against
vsftpd and pyftpdlib, with servers that refuse one command or announce a foreign address)::

  client  mode  IPv4 IPv6  switches                                  227/228 address  on refusal
  curl    PORT  yes  -     --ftp-port - --disable-eprt               -                fails
  curl    EPRT  yes  yes   --ftp-port -                              -                PORT (v4) (1)
  curl    PASV  yes  -     --ftp-pasv --disable-epsv                 used (with       fails
                           --no-ftp-skip-pasv-ip                     the switch)
  curl    EPSV  yes  yes   --ftp-pasv                                -                PASV (v4) (1)
  lftp    PORT  yes  -     ftp:passive-mode off                      -                fails
  lftp    EPRT  -    yes   ftp:passive-mode off                      -                fails
  lftp    PASV  yes  -     ftp:passive-mode on, ftp:prefer-epsv no,  used             fails
                           ftp:ignore-pasv-address no, ftp:fix-pasv-address no
  lftp    EPSV  yes  yes   ftp:passive-mode on, ftp:prefer-epsv yes  -                fails (2)
  wget    PORT  yes  -     --no-passive-ftp                          -                fails
  wget    EPRT  -    yes   --no-passive-ftp                          -                LPRT (1)
  wget    PASV  yes  -     --passive-ftp                             used (always)    fails
  wget    EPSV  -    yes   --passive-ftp                             -                LPSV (1)
  tnftp   PORT  yes  -     -A, netrc init macro "epsv4 off"          -                fails
  tnftp   EPRT  yes  yes   -A                                        -                PORT (v4),
                                                                                      LPRT (v6) (1)
  tnftp   LPRT  -    yes   -A, netrc init macro "epsv6 off"          -                fails
  tnftp   PASV  yes  -     -p, netrc init macro "epsv4 off"          NOT used (3)     fails
  tnftp   EPSV  yes  yes   -p                                        -                PASV (v4),
                                                                                      LPSV (v6) (1)
  tnftp   LPSV  -    yes   -p, netrc init macro "epsv6 off"          NOT used (3)     fails
  ftplib  all six, IPv4 and IPv6 (PORT and PASV: IPv4 only): ``ftpalg.lab.ftpclient --mode``,
          strict; PASV and LPSV use the reply's address (trust_server_pasv_ipv4_address).

(1) The client falls back on its own to the other command when the server refuses the first
one, with no switch to stop it. ``argv(strict=True)`` (the default) runs such a client under
``python -m ftpalg.lab.clients strict MODE -- ...`` with its debug transcript on (curl ``-v``,
wget ``-d``, tnftp ``-d``), which fails (exit 3) if any other data-connection command was
sent, so a fallback can never pass for the mode under test. All other kinds are strict by
their switches. (2) lftp retries EPSV as PASV ("EPSV failed, will try PASV") only on a
retry, which ``net:max-retries 1`` forbids. (3) tnftp refuses a 227/228 whose address
is not the control connection's peer ("Passive mode address mismatch.", exit 1); there is no
switch for that, so behind a NAT that leaves a private address in 227 it fails, and it never
connects to a foreign address. curl's default (``--ftp-skip-pasv-ip``) ignores the 227
address; lftp's default ``ftp:fix-pasv-address`` replaces a private one from a public server.

Per client:

* curl: ``--ftp-port -`` is active mode on the control connection's local address, EPRT
  first; ``--disable-eprt`` sends PORT. Passive is EPSV first; ``--disable-epsv`` sends PASV.
  On IPv6 curl ignores both ``--disable-*`` switches (it sends EPRT/EPSV anyway), so PORT
  and PASV are IPv4 only. It never sends LPRT/LPSV. ``--interface ADDR`` sets the source,
  ``-g`` keeps the brackets of an IPv6 URL, ``-q`` skips ~/.curlrc. ``--max-time`` bounds
  the whole transfer: curl waits that long after a refused EPRT over IPv6 (exit 28).
* lftp: sends PORT for an IPv4 data address and EPRT for an IPv6 one, nothing else (no
  EPRT over IPv4, no LPRT); passive: PASV, or EPSV with ``ftp:prefer-epsv yes`` and always
  over IPv6. ``ftp:auto-passive-mode no`` (no switch to active after a failure),
  ``ftp:ssl-allow no`` (no AUTH TLS), ``net:max-retries 1``, ``net:timeout``,
  ``net:socket-bind-ipv4/6`` for the source, ``--norc``; ``-c`` exits with the status of the
  last command, i.e. of the transfer.
* wget: over IPv4 PASV (``--passive-ftp``, Debian's /etc/wgetrc default) or PORT
  (``--no-passive-ftp``), over IPv6 EPSV ("EPSV 2") or EPRT, falling back to LPSV/LPRT. It
  always uses the 227 address. No upload. ``--no-config``, ``-t 1`` (one try), ``-T``
  (DNS, connect and read timeouts), ``--bind-address`` for the source.
* tnftp (the BSD ``ftp``): auto-fetch of a URL (``-o OUT URL``, upload ``-u URL FILE``),
  whose exit status is the transfer's (a script on stdin exits 0 even when a transfer
  fails). ``-A`` active only, ``-p`` passive only (without either it falls back from
  passive to active). The ``epsv4``/``epsv6`` toggles exist only as commands, so they go in
  the ``init`` macro of a netrc file given with ``-N`` (written by this module into a
  private directory, ``tnftp_netrc()``): epsv4 off = PASV/PORT over IPv4, epsv6 off =
  LPSV/LPRT over IPv6. ``-q`` quits a stalled transfer, ``-s`` sets the source.
* ftplib: ``ftpalg.lab.ftpclient`` (see there): every mode, strict, both families (PORT and
  PASV IPv4 only), uploads too.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

MODES = ("PORT", "EPRT", "LPRT", "PASV", "EPSV", "LPSV")
ACTIVE_MODES = ("PORT", "EPRT", "LPRT")
CLIENT_NAMES = ("curl", "lftp", "ftplib", "wget", "tnftp")
TIMEOUT = 20
"""Seconds: connect timeout and stall timeout of every client; curl's whole transfer."""

_V4, _V6, _BOTH = frozenset({4}), frozenset({6}), frozenset({4, 6})
_FAMILIES: dict[tuple[str, str], frozenset[int]] = {
    ("curl", "PORT"): _V4, ("curl", "EPRT"): _BOTH, ("curl", "PASV"): _V4, ("curl", "EPSV"): _BOTH,
    ("lftp", "PORT"): _V4, ("lftp", "EPRT"): _V6, ("lftp", "PASV"): _V4, ("lftp", "EPSV"): _BOTH,
    ("ftplib", "PORT"): _V4, ("ftplib", "EPRT"): _BOTH, ("ftplib", "LPRT"): _BOTH,
    ("ftplib", "PASV"): _V4, ("ftplib", "EPSV"): _BOTH, ("ftplib", "LPSV"): _BOTH,
    ("wget", "PORT"): _V4, ("wget", "EPRT"): _V6, ("wget", "PASV"): _V4, ("wget", "EPSV"): _V6,
    ("tnftp", "PORT"): _V4, ("tnftp", "EPRT"): _BOTH, ("tnftp", "LPRT"): _V6,
    ("tnftp", "PASV"): _V4, ("tnftp", "EPSV"): _BOTH, ("tnftp", "LPSV"): _V6,
}
"""(client, mode) -> address families in which the client can be made to send that command."""

_FALLBACKS: dict[tuple[str, str], str] = {
    ("curl", "EPRT"): "PORT", ("curl", "EPSV"): "PASV",
    ("wget", "EPRT"): "LPRT", ("wget", "EPSV"): "LPSV",
    ("tnftp", "EPRT"): "PORT or LPRT", ("tnftp", "EPSV"): "PASV or LPSV",
}
"""Kinds whose client falls back by itself when the server refuses the command."""

# What the strict wrapper looks for in a client's debug transcript: curl "> EPSV",
# wget "--> EPSV 2", tnftp "---> PORT 192,0,2,1,4,1" (tnftp does not always echo EPSV/EPRT,
# it does echo the fallback).
_SENT = re.compile(r"^-*> (PORT|EPRT|LPRT|PASV|EPSV|LPSV)\b", re.MULTILINE)


def address_family(host: str) -> int | None:
    """4 or 6 for an address literal, None for a name."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).version
    except ValueError:
        return None


def _url(host: str, port: int, path: str) -> str:
    h = f"[{host}]" if address_family(host) == 6 else host
    return f"ftp://{h}:{port}/{quote(path.lstrip('/'))}"


def _lftp_quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def tnftp_netrc(mode: str) -> Path:
    """A netrc file whose ``init`` macro sets tnftp's epsv4/epsv6 toggles for ``mode``,
    in a directory of this user's own (created 0700 under the temporary directory)."""
    lines = {"PORT": ["epsv4 off"], "PASV": ["epsv4 off"], "LPRT": ["epsv6 off"], "LPSV": ["epsv6 off"]}
    toggles = lines.get(mode, ["epsv4 on", "epsv6 on"])
    text = "default login anonymous password ftpalg@\nmacdef init\n" + "".join(f"{t}\n" for t in toggles) + "\n"
    d = Path(tempfile.gettempdir()) / f"ftpalg-tnftp-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        d.mkdir(mode=0o700)
    st = d.lstat()
    if not d.is_dir() or d.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{d} is not a private directory of this user")
    path = d / f"{mode.lower()}.netrc"
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return path
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{path.name}.")  # 0600
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class ClientKind:
    """Client ``name`` (one of CLIENT_NAMES) opening its data connections with ``mode``."""

    name: str
    mode: str

    def __post_init__(self) -> None:
        if (self.name, self.mode) not in _FAMILIES:
            raise ValueError(f"{self.name} cannot be made to send {self.mode}")

    @property
    def label(self) -> str:
        return f"{self.name} {self.mode}"

    @property
    def active(self) -> bool:
        return self.mode in ACTIVE_MODES

    @property
    def families(self) -> frozenset[int]:
        """Address families (4, 6) over which this client sends this mode's command."""
        return _FAMILIES[(self.name, self.mode)]

    def supports(self, host: str) -> bool:
        """Whether this kind works with ``host`` (an IPv4/IPv6 literal; a name: assumed)."""
        f = address_family(host)
        return f is None or f in self.families

    @property
    def fallback(self) -> str | None:
        """The command(s) the client itself falls back to when the server refuses ``mode``
        (then ``argv(strict=True)`` fails instead), or None."""
        return _FALLBACKS.get((self.name, self.mode))

    @property
    def uses_reply_address(self) -> bool | None:
        """PASV/LPSV: whether the data connection goes to the address announced in the
        227/228 reply (tnftp: never, it refuses one that is not the server's). None for
        the other modes, whose replies carry no address."""
        if self.mode not in ("PASV", "LPSV"):
            return None
        return self.name != "tnftp"

    @property
    def uploads(self) -> bool:
        """Whether ``upload_argv`` gives a command (wget cannot upload)."""
        return self.name != "wget"

    def _check(self, host: str) -> None:
        if not self.supports(host):
            raise ValueError(f"{self.label} does not work over IPv{address_family(host)} ({host})")

    def _strict(self, argv: list[str], strict: bool) -> list[str]:
        if strict and self.fallback:
            return [sys.executable, "-m", "ftpalg.lab.clients", "strict", self.mode, "--", *argv]
        return argv

    def argv(self, host: str, remote: str, out: Path, port: int = 21, source: str | None = None,
             strict: bool = True) -> list[str]:
        """Download ftp://host:port/remote to ``out`` (anonymous), connecting from
        ``source`` if given. ``strict``: fail if the client fell back to another command
        (see ``fallback``); False gives the bare client command line."""
        return self._command("get", host, port, remote, out, source, strict)

    def upload_argv(self, host: str, local: Path, remote: str, port: int = 21, source: str | None = None,
                    strict: bool = True) -> list[str] | None:
        """Upload ``local`` to ftp://host:port/remote, or None if the client cannot (wget)."""
        if not self.uploads:
            return None
        return self._command("put", host, port, remote, local, source, strict)

    def _command(self, op: str, host: str, port: int, remote: str, local: Path, source: str | None,
                 strict: bool) -> list[str]:
        """``op`` "get": download ``remote`` to ``local``; "put": upload ``local`` to ``remote``."""
        self._check(host)
        get = op == "get"
        url = _url(host, port, remote)
        debug = strict and self.fallback is not None
        if self.name == "curl":
            argv = ["curl", "-q", "-g", "-sS", "--noproxy", "*",
                    "--connect-timeout", str(TIMEOUT // 2), "--max-time", str(TIMEOUT)]
            argv += ["-v"] if debug else []
            argv += {"PORT": ["--ftp-port", "-", "--disable-eprt"], "EPRT": ["--ftp-port", "-"],
                     "PASV": ["--ftp-pasv", "--disable-epsv", "--no-ftp-skip-pasv-ip"],
                     "EPSV": ["--ftp-pasv"]}[self.mode]
            argv += ["--interface", source] if source else []
            argv += ["-o" if get else "-T", str(local), url]
        elif self.name == "lftp":
            settings = ["ftp:proxy ''", "ftp:ssl-allow no", "ftp:auto-passive-mode no", f"net:timeout {TIMEOUT // 2}",
                        "net:max-retries 1", "net:persist-retries 0", "xfer:clobber on",
                        f"ftp:passive-mode {'off' if self.active else 'on'}",
                        f"ftp:prefer-epsv {'yes' if self.mode == 'EPSV' else 'no'}",
                        "ftp:ignore-pasv-address no", "ftp:fix-pasv-address no"]
            if source:
                settings.append(f"net:socket-bind-ipv{address_family(source) or 4} {source}")
            h = f"[{host}]" if address_family(host) == 6 else host
            script = "".join(f"set {s}; " for s in settings) + f"open {_lftp_quote(f'ftp://{h}:{port}')}; "
            if get:
                script += f"get {_lftp_quote(remote)} -o {_lftp_quote(str(local))}"
            else:
                script += f"put {_lftp_quote(str(local))} -o {_lftp_quote(remote)}"
            argv = ["lftp", "--norc", "-c", script]
        elif self.name == "ftplib":
            argv = [sys.executable, "-m", "ftpalg.lab.ftpclient", host]
            argv += ["get", remote, str(local)] if get else ["put", str(local), remote]
            argv += ["--mode", self.mode, "--port", str(port), "--timeout", str(TIMEOUT)]
            argv += ["--source", source] if source else []
        elif self.name == "wget":
            argv = ["wget", "--no-config", "--no-proxy", "-nv", "-t", "1", "-T", str(TIMEOUT)]
            argv += ["-d"] if debug else []
            argv += ["--no-passive-ftp" if self.active else "--passive-ftp"]
            argv += [f"--bind-address={source}"] if source else []
            argv += ["-O", str(local), url]
        else:  # tnftp
            argv = ["tnftp", "-N", str(tnftp_netrc(self.mode)), "-V", "-q", str(TIMEOUT),
                    "-A" if self.active else "-p"]
            argv += ["-d"] if debug else []
            argv += ["-s", source] if source else []
            argv += ["-o", str(local), url] if get else ["-u", url, str(local)]
        return self._strict(argv, strict)


CLIENT_KINDS: tuple[ClientKind, ...] = tuple(
    ClientKind(n, m) for n in CLIENT_NAMES for m in MODES if (n, m) in _FAMILIES)


def kinds(mode: str | None = None, name: str | None = None, family: int | None = None) -> tuple[ClientKind, ...]:
    """CLIENT_KINDS, only those with this ``mode``, client ``name`` and address ``family``
    (4 or 6) where given."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    if name is not None and name not in CLIENT_NAMES:
        raise ValueError(f"unknown client {name!r}")
    return tuple(k for k in CLIENT_KINDS if (mode is None or k.mode == mode) and (name is None or k.name == name)
                 and (family is None or family in k.families))


_ERROR_REPLY = re.compile(r"\b[45]\d\d[ -][^\r\n)]*")


def failure_reason(text: str, rc: int | None, timeout: float = TIMEOUT) -> str:
    """Why a client failed, from its output ``text`` and exit status ``rc`` (None: killed
    after ``timeout`` seconds): the first FTP error reply it printed, else its last line."""
    replies = _ERROR_REPLY.findall(text)
    if replies:
        return replies[0].strip()
    if rc is None:
        return f"no answer within {timeout:.0f} s"
    # the client's own last words, not the commands it echoed (curl "> ", tnftp "---> ")
    lines = [line for line in text.strip().splitlines()
             if line.strip() and not line.startswith((">", "--->", "<", "*"))]
    return lines[-1].strip() if lines else f"exit {rc}"


def sent_commands(transcript: str) -> list[str]:
    """Data-connection commands named in a client's debug transcript (curl -v, wget -d,
    tnftp -d; tnftp does not always echo EPSV and EPRT)."""
    return _SENT.findall(transcript)


def strict(mode: str, argv: list[str]) -> int:
    """Run ``argv``; its exit status, or 3 if its transcript shows a data-connection
    command other than ``mode``'s (the client fell back)."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=4 * TIMEOUT)
    except subprocess.TimeoutExpired as e:
        print(f"ftpalg.lab.clients: {argv[0]} still running after {e.timeout} s, killed", file=sys.stderr)
        return 124
    sys.stdout.write(p.stdout)
    sys.stderr.write(p.stderr)
    others = sorted({c for c in sent_commands(p.stdout + "\n" + p.stderr) if c != mode})
    if others:
        print(f"ftpalg.lab.clients: {argv[0]} in {mode} mode sent {', '.join(others)} (a fallback)",
              file=sys.stderr)
        return 3
    return p.returncode


def main(argv: list[str] | None = None) -> int:
    """``strict MODE -- ARGV...`` (see ``strict``) or ``list`` (the kinds and their families)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) >= 4 and args[0] == "strict" and args[1] in MODES and args[2] == "--":
        return strict(args[1], args[3:])
    if args == ["list"]:
        for k in CLIENT_KINDS:
            fams = "/".join(f"IPv{f}" for f in sorted(k.families))
            print(f"{k.label:<12} {fams:<10} {'falls back to ' + k.fallback if k.fallback else ''}")
        return 0
    print("usage: python -m ftpalg.lab.clients (strict MODE -- ARGV... | list)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
