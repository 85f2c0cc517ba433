"""Record real sessions on the gateway (both interfaces) with ftpalg running, check the
core's offline replay against them, and keep them as tests/data recordings when
FTPALG_RECORD=1."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ftpalg.lab.lab import OUTSIDE_CLIENTS, PUBLIC_OF, SERVERS, Lab
from pcap_replay import replay

pytestmark = pytest.mark.netns
DATA = Path(__file__).resolve().parent / "data"

SESSION = """
    import sys
    sys.path.insert(0, {root!r})
    from ftpalg.lab.ftpclient import ActiveFTP
    ftp = ActiveFTP(eprt={eprt}, data_port=0, timeout=10)
    ftp.connect({host!r}, 21)
    ftp.login()
    ftp.retrlines("LIST", lambda line: None)
    for _ in range(3):
        ftp.retrbinary("RETR small.txt", lambda b: None)
    ftp.quit()
"""


def record(lab: Lab, name: str, gw: str, devs: tuple[str, str], ns: str, code: str) -> tuple[str, int, list[str]]:
    """Run ``code`` in ``ns`` with ftpalg in ``gw``, capturing the control port on the
    client-side and server-side devices ``devs``; replay the capture through the core and
    keep it in tests/data when FTPALG_RECORD=1. Returns (ftpalg's log, packets compared,
    mismatches)."""
    caps = {}
    for side, dev in zip(("inside", "outside"), devs, strict=True):
        path = lab.state / f"{name}-{side}.pcap"
        caps[side] = (path, lab.capture(gw, dev, path))
    p = lab.start_ftpalg(gw=gw)
    try:
        res = lab.ns(ns, [sys.executable, "-c", textwrap.dedent(code)], check=False)
        time.sleep(0.5)
    finally:
        lab.stop_ftpalg(p)
        for _, proc in caps.values():
            lab.stop_capture(proc)
    assert res.returncode == 0, res.stderr
    n, bad = replay(caps["inside"][0], caps["outside"][0])
    if os.environ.get("FTPALG_RECORD") == "1":
        for side, (path, _) in caps.items():
            shutil.copy(path, DATA / f"{name}-{side}.pcap")
    return lab.ftpalg_log(gw), n, bad


@pytest.mark.parametrize("server, eprt", [("vsftpd", False), ("pyftpdlib", True)])
def test_record_and_replay(lab, server, eprt):
    code = SESSION.format(root=str(Path(__file__).resolve().parent.parent), eprt=eprt, host=SERVERS[server])
    log, n, bad = record(lab, f"{server}-{'eprt' if eprt else 'port'}", lab.gw, ("gi", "go"), lab.client, code)
    assert log.count("pinhole open") == 4
    assert n > 20 and bad == []


PASSIVE_SESSION = """
    import sys
    sys.path.insert(0, {root!r})
    from ftpalg.lab.ftpclient import LabFTP
    for mode in ("PASV", "EPSV", "PORT"):
        ftp = LabFTP(mode, timeout=10)
        ftp.connect({host!r}, 21, source_address=({source!r}, 0))
        ftp.login()
        ftp.retrlines("LIST", lambda line: None)
        for _ in range(2):
            ftp.retrbinary("RETR small.txt", lambda b: None)
        ftp.quit()
"""


@pytest.mark.parametrize("server", ["vsftpd", "pyftpdlib"])
def test_record_and_replay_server_behind_dnat(lab, server):
    """gw2: the client arrives on go, the server behind DNAT on gi; 227 rewritten, 229 and
    the client's own PORT opened without rewrite."""
    code = PASSIVE_SESSION.format(root=str(Path(__file__).resolve().parent.parent), host=PUBLIC_OF[server],
                                  source=OUTSIDE_CLIENTS[0])
    # client side go, server side gi
    log, n, bad = record(lab, f"{server}-dnat", lab.gw2, ("go", "gi"), lab.server, code)
    assert log.count("pinhole open") == 9 and log.count("-> b'227") == 3
    assert n > 40 and bad == []
