"""The outside client of the service lab (``service.py``), run in its client namespace:

    python -m ftpalg.lab.service_clients CLIENT MODE HOST PORT FILE N [--timeout S]

runs N sessions one after the other, each a new control connection that downloads FILE with
CLIENT ("ftplib": ``ftpclient.LabFTP``; "curl": one curl process per session) in MODE (one
of ``MODES``), and prints one JSON line per session: ``replica`` (the number in the
server's 220 banner, "replica N of M": which replica the control connection reached, None
without a banner), ``sha256`` of the downloaded bytes (None if the transfer failed) and
``error``. Which replica the data connection reached is for the caller to tell from the
SHA-256: every replica serves contents of its own.

Modes: PASV (the data connection goes to the 227 reply's address: ftplib with
``trust_server_pasv_ipv4_address``, curl ``--no-ftp-skip-pasv-ip``), PASV-PEER (the 227
address is ignored, its port used at the control connection's peer: ftplib's and curl's
default), EPSV, PORT, EPRT. Each session sends only its mode's command (curl's transcript
is checked: a fallback to another command is an error).
"""

from __future__ import annotations

import argparse
import ftplib
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .clients import sent_commands
from .ftpclient import LabFTP

MODES = ("PASV", "PASV-PEER", "EPSV", "PORT", "EPRT")
CLIENTS = ("ftplib", "curl")
_BANNER = re.compile(r"^(?:< )?220[ -].*?replica (\d+)", re.MULTILINE)
_ERROR_REPLY = re.compile(r"^< ([45]\d\d .*?)\r?$", re.MULTILINE)
_MS = re.compile(r" after \d+ ms")
_CURL_MODE = {
    "PASV": ["--ftp-pasv", "--disable-epsv", "--no-ftp-skip-pasv-ip"],
    "PASV-PEER": ["--ftp-pasv", "--disable-epsv", "--ftp-skip-pasv-ip"],
    "EPSV": ["--ftp-pasv"],
    "PORT": ["--ftp-port", "-", "--disable-eprt"],
    "EPRT": ["--ftp-port", "-"],
}


def replica_of(banner: str) -> int | None:
    m = _BANNER.search(banner)
    return int(m.group(1)) if m else None


class PeerPasvFTP(LabFTP):
    """PASV whose reply's address is ignored: the data connection goes to the control
    connection's peer, at the reply's port (ftplib's default, curl's ``--ftp-skip-pasv-ip``)."""

    def makepasv(self) -> tuple[str, int]:
        assert self.sock is not None
        _, port = ftplib.parse227(self.sendcmd("PASV"))
        return self.sock.getpeername()[0], port


def ftplib_session(mode: str, host: str, port: int, remote: str, timeout: float) -> dict[str, object]:
    ftp = PeerPasvFTP("PASV", timeout=timeout) if mode == "PASV-PEER" else LabFTP(mode, timeout=timeout)
    h = hashlib.sha256()
    out: dict[str, object] = {"replica": None, "sha256": None, "error": ""}
    try:
        out["replica"] = replica_of(ftp.connect(host, port))
        ftp.login()
        ftp.retrbinary(f"RETR {remote}", h.update)
        out["sha256"] = h.hexdigest()
        ftp.quit()
    except (ftplib.Error, OSError, EOFError, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        ftp.close()
    return out


def curl_session(mode: str, host: str, port: int, remote: str, timeout: float, tmp: Path) -> dict[str, object]:
    dest = tmp / "download"
    dest.unlink(missing_ok=True)
    argv = ["curl", "-q", "-v", "-sS", "--noproxy", "*", "--connect-timeout", str(timeout),
            "--max-time", str(2 * timeout), *_CURL_MODE[mode], "-o", str(dest), f"ftp://{host}:{port}/{remote}"]
    out: dict[str, object] = {"replica": None, "sha256": None, "error": ""}
    try:
        p = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=4 * timeout)
    except subprocess.TimeoutExpired:
        out["error"] = "curl did not finish"
        return out
    out["replica"] = replica_of(p.stderr)
    sent = {c for c in sent_commands(p.stderr)}
    want = mode.split("-")[0]
    if sent - {want}:
        out["error"] = f"curl sent {', '.join(sorted(sent))} in {mode} mode (a fallback)"
    elif p.returncode != 0:
        replies = _ERROR_REPLY.findall(p.stderr)
        lines = [x for x in p.stderr.splitlines() if x.startswith("curl:")]
        out["error"] = replies[0] if replies else _MS.sub("", lines[-1]) if lines else f"curl exit {p.returncode}"
    elif dest.exists():
        out["sha256"] = hashlib.sha256(dest.read_bytes()).hexdigest()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ftpalg.lab.service_clients")
    ap.add_argument("client", choices=CLIENTS)
    ap.add_argument("mode", choices=MODES)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("file")
    ap.add_argument("n", type=int)
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ftpalg-svc-") as d:
        for _ in range(args.n):
            if args.client == "ftplib":
                res = ftplib_session(args.mode, args.host, args.port, args.file, args.timeout)
            else:
                res = curl_session(args.mode, args.host, args.port, args.file, args.timeout, Path(d))
            print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
