"""Record the captures ``tests/test_explain.py`` explains: real FTP sessions in the namespace
lab, captured with tcpdump on the gateways' interfaces (all TCP and ICMP, so the data
connections and any ICMP error are in them).

Run as root from the repository (needs the lab's packages, ``./dev.sh setup``)::

    .venv/bin/python tests/data/explain/record.py [--prefix hex] [--out tests/data/explain]

It builds a lab with the namespace prefix (letters only; default ``hex``), records, and
always tears the lab down again. Nothing touches the host's own namespace. The captures:

``active-fail-inside.pcap`` / ``active-fail-outside.pcap``
    Inside client 10.0.0.2 behind gw (MASQUERADE to 203.0.113.1), Python ftplib in active
    mode (PORT), to vsftpd (203.0.113.2) and pure-ftpd (203.0.113.5) outside; no ftpalg: the
    PORT names 10.0.0.2, both servers refuse it (``500 Illegal PORT command.``, ``500 I won't
    open a connection to 10.0.0.2 (only to 203.0.113.1)``): no data connection. Captured on
    gw's ``gi`` (inside) and ``go`` (outside).
``passive-fail-outside.pcap`` / ``passive-fail-inside.pcap``
    Outside client 203.0.113.100 to vsftpd behind gw2 (public 198.51.100.2, DNAT of tcp/21
    only, to 10.1.0.2); no ftpalg. Python ftplib in PASV mode trusting the 227 address
    (connects to 10.1.0.2: unreachable, no SYN leaves the client), then curl (ignores the
    227 address, connects to 198.51.100.2:port, which gw2 answers with RST). Captured on
    gw2's ``go`` (outside) and ``gi`` (inside).
``good-inside.pcap``
    As the active case, with ``ftpalg run`` in gw: PORT and PASV transfers from 10.0.0.2 to
    vsftpd 203.0.113.2 work. Captured on gw's ``gi``.
``ftps-inside.pcap``
    ftplib ``FTP_TLS`` (``AUTH TLS``, then a PASV listing) from 10.0.0.2 to the lab's FTPS
    vsftpd (203.0.113.7, ``ftpalg.lab.tls``), no ftpalg. Captured on gw's ``gi``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from ftpalg.lab.lab import CLIENTS, OUTSIDE_CLIENTS, PUBLIC_OF, SERVERS, Lab  # noqa: E402

BPF = "tcp or icmp"

ACTIVE = """
    import sys
    sys.path.insert(0, {root!r})
    from ftpalg.lab.ftpclient import LabFTP
    for host in {hosts!r}:
        ftp = LabFTP("PORT", timeout=4)
        ftp.connect(host, 21)
        ftp.login()
        try:
            ftp.retrbinary("RETR small.txt", lambda b: None)
            print(host, "ok")
        except Exception as e:
            print(host, type(e).__name__, e)
        try:
            ftp.quit()
        except Exception:
            ftp.close()
"""

PASSIVE_FTPLIB = """
    import sys
    sys.path.insert(0, {root!r})
    from ftpalg.lab.ftpclient import LabFTP
    ftp = LabFTP("PASV", timeout=4)
    ftp.connect({host!r}, 21, source_address=({source!r}, 0))
    ftp.login()
    try:
        ftp.retrbinary("RETR small.txt", lambda b: None)
        print("ok")
    except Exception as e:
        print(type(e).__name__, e)
    ftp.close()
"""

GOOD = """
    import sys
    sys.path.insert(0, {root!r})
    from ftpalg.lab.ftpclient import LabFTP
    for mode in ("PORT", "PASV"):
        ftp = LabFTP(mode, timeout=5)
        ftp.connect({host!r}, 21)
        ftp.login()
        ftp.retrlines("LIST", lambda line: None)
        ftp.retrbinary("RETR small.txt", lambda b: None)
        ftp.quit()
    print("ok")
"""

FTPS = """
    import ftplib, ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ftp = ftplib.FTP_TLS(context=ctx, timeout=5)
    ftp.connect({host!r}, 21)
    ftp.auth()
    ftp.login()
    ftp.prot_p()
    ftp.retrlines("LIST", lambda line: None)
    ftp.quit()
    print("ok")
"""


def py(lab: Lab, ns: str, code: str, **kw: object) -> str:
    res = lab.ns(ns, [sys.executable, "-c", textwrap.dedent(code).format(root=str(ROOT), **kw)], check=False,
                 timeout=60)
    return (res.stdout + res.stderr).strip()


class Captures:
    """tcpdump on several (namespace, device) at once, copied to ``out`` when stopped."""

    def __init__(self, lab: Lab, out: Path, name: str, where: dict[str, tuple[str, str]]) -> None:
        self.lab, self.out, self.name = lab, out, name
        self.paths = {side: lab.state / f"{name}-{side}.pcap" for side in where}
        self.procs = [lab.capture(ns, dev, self.paths[side], BPF) for side, (ns, dev) in where.items()]

    def stop(self) -> None:
        for p in self.procs:
            self.lab.stop_capture(p)
        for side, path in self.paths.items():
            shutil.copy(path, self.out / f"{self.name}-{side}.pcap")
            print(f"  {self.name}-{side}.pcap: {path.stat().st_size} bytes")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", default="hex", help="lab namespace prefix, letters only (default hex)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args(argv)
    if not args.prefix.isalpha():
        ap.error("--prefix: letters only")
    args.out.mkdir(parents=True, exist_ok=True)
    lab = Lab(args.prefix)
    try:
        lab.up()
        print("active mode, client behind gw, no ftpalg")
        cap = Captures(lab, args.out, "active-fail", {"inside": (lab.gw, "gi"), "outside": (lab.gw, "go")})
        print(" ", py(lab, lab.client, ACTIVE, hosts=[SERVERS["vsftpd"], SERVERS["pure-ftpd"]]))
        time.sleep(0.5)
        cap.stop()

        print("passive mode, server behind gw2, no ftpalg")
        cap = Captures(lab, args.out, "passive-fail", {"outside": (lab.gw2, "go"), "inside": (lab.gw2, "gi")})
        print(" ", py(lab, lab.server, PASSIVE_FTPLIB, host=PUBLIC_OF["vsftpd"], source=OUTSIDE_CLIENTS[0]))
        res = lab.ns(lab.server, ["curl", "-sS", "--max-time", "8", "--interface", OUTSIDE_CLIENTS[0],
                                  "-o", "/dev/null", f"ftp://{PUBLIC_OF['vsftpd']}/small.txt"], check=False)
        print("  curl:", res.returncode, res.stderr.strip())
        time.sleep(0.5)
        cap.stop()

        print("active and passive mode, client behind gw, with ftpalg")
        cap = Captures(lab, args.out, "good", {"inside": (lab.gw, "gi")})
        p = lab.start_ftpalg(gw=lab.gw)
        try:
            print(" ", py(lab, lab.client, GOOD, host=SERVERS["vsftpd"]))
            time.sleep(0.5)
        finally:
            lab.stop_ftpalg(p)
            cap.stop()

        print("FTPS, client behind gw, no ftpalg")
        from ftpalg.lab.tls import TLS_SERVER, tls_server

        with tls_server(lab):
            cap = Captures(lab, args.out, "ftps", {"inside": (lab.gw, "gi")})
            print(" ", py(lab, lab.client, FTPS, host=TLS_SERVER))
            time.sleep(0.5)
            cap.stop()
        print(f"client {CLIENTS[0]}; captures in {args.out}")
    finally:
        lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
