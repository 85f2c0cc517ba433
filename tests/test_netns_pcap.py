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

from ftpalg.lab.lab import OUTSIDE_CLIENTS, PUBLIC_OF, SERVERS
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


@pytest.mark.parametrize("server, eprt", [("vsftpd", False), ("pyftpdlib", True)])
def test_record_and_replay(lab, server, eprt):
    name = f"{server}-{'eprt' if eprt else 'port'}"
    caps = {}
    for side, dev in (("inside", "gi"), ("outside", "go")):
        path = lab.state / f"{name}-{side}.pcap"
        caps[side] = (path, lab.capture(lab.gw, dev, path))
    p = lab.start_ftpalg()
    try:
        code = SESSION.format(root=str(Path(__file__).resolve().parent.parent), eprt=eprt, host=SERVERS[server])
        res = lab.ns(lab.client, [sys.executable, "-c", textwrap.dedent(code)], check=False)
        time.sleep(0.5)
    finally:
        lab.stop_ftpalg(p)
        for _, proc in caps.values():
            lab.stop_capture(proc)
    assert res.returncode == 0, res.stderr
    assert lab.ftpalg_log().count("pinhole open") == 4
    n, bad = replay(caps["inside"][0], caps["outside"][0])
    assert n > 20 and bad == []
    if os.environ.get("FTPALG_RECORD") == "1":
        for side, (path, _) in caps.items():
            shutil.copy(path, DATA / f"{name}-{side}.pcap")


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
    name = f"{server}-dnat"
    caps = {}
    for side, dev in (("inside", "go"), ("outside", "gi")):  # client side, server side
        path = lab.state / f"{name}-{side}.pcap"
        caps[side] = (path, lab.capture(lab.gw2, dev, path))
    p = lab.start_ftpalg(gw=lab.gw2)
    try:
        code = PASSIVE_SESSION.format(root=str(Path(__file__).resolve().parent.parent), host=PUBLIC_OF[server],
                                      source=OUTSIDE_CLIENTS[0])
        res = lab.ns(lab.server, [sys.executable, "-c", textwrap.dedent(code)], check=False)
        time.sleep(0.5)
    finally:
        lab.stop_ftpalg(p)
        for _, proc in caps.values():
            lab.stop_capture(proc)
    assert res.returncode == 0, res.stderr
    log = lab.ftpalg_log(lab.gw2)
    assert log.count("pinhole open") == 9 and log.count("-> b'227") == 3
    n, bad = replay(caps["inside"][0], caps["outside"][0])
    assert n > 40 and bad == []
    if os.environ.get("FTPALG_RECORD") == "1":
        for side, (path, _) in caps.items():
            shutil.copy(path, DATA / f"{name}-{side}.pcap")
