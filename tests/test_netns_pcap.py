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

from ftpalg.lab.lab import SERVERS
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
