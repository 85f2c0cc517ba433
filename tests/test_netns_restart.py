"""Kernel-held state in practice: a session whose lines were rewritten survives ``kill -9`` of
ftpalg and its restart, and a clean stop; what ftpalg added is gone after a clean exit."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ftpalg.lab.lab import GW_PUBLIC, SERVERS, Lab, sha256

pytestmark = pytest.mark.netns

SESSION = r"""
import hashlib, sys
sys.path.insert(0, sys.argv[1])
from ftpalg.lab.ftpclient import LabFTP
ftp = LabFTP("PORT", timeout=15)
ftp.connect(sys.argv[2], 21)
ftp.login()
for step in sys.stdin:  # one transfer per line the test sends: PORT, EPRT, PASV or NOOP
    mode = step.strip()
    try:
        if mode == "NOOP":
            print(ftp.voidcmd("NOOP"), flush=True)
            continue
        ftp.mode = mode
        ftp.passiveserver = mode == "PASV"
        h = hashlib.sha256()
        ftp.retrbinary("RETR big.bin", h.update)
        print(h.hexdigest(), flush=True)
    except Exception as e:
        print(f"ERROR {type(e).__name__}: {e}", flush=True)
ftp.quit()
print("BYE", flush=True)
"""


class Session:
    """One control connection kept open across ftpalg's life: the test drives it step by step."""

    def __init__(self, lab: Lab, server: str) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        self.p = subprocess.Popen(["ip", "netns", "exec", lab.client, sys.executable, "-c", SESSION, root, server],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def step(self, what: str) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(what + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def close(self) -> str:
        assert self.p.stdin is not None
        self.p.stdin.close()
        out = self.p.stdout.read() if self.p.stdout else ""
        self.p.wait(15)
        return out.strip()


@pytest.mark.parametrize("server", ["vsftpd", "pyftpdlib"])
def test_rewritten_session_survives_kill_9_and_restart(lab, server):
    want = sha256(lab.files / "big.bin")
    before = lab.ruleset()
    p = lab.start_ftpalg()
    s = Session(lab, SERVERS[server])
    try:
        assert s.step("PORT") == want  # rewritten: the connection now has seq corrections
        assert "pinhole open" in lab.ftpalg_log() and GW_PUBLIC.replace(".", ",") in lab.ftpalg_log()
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        lab.procs.remove(p)
        # nobody serves the queue: packets bypass it, the kernel keeps correcting seq/ack
        assert s.step("NOOP").startswith("200")
        assert s.step("PASV") == want
        p = lab.start_ftpalg()  # picks the session up without a new SYN
        assert s.step("PORT") == want
        assert s.step("EPRT") == want
        assert s.step("PASV") == want
        log = lab.ftpalg_log()
        assert log.count("pinhole open") == 3 and "Traceback" not in log
    finally:
        rc = lab.stop_ftpalg(p)
    try:
        assert rc == 0
        # a clean stop: what ftpalg added is gone (also the tables iptables-nft made for the
        # first, killed instance), and the session still works without it
        assert lab.ruleset() == before
        assert lab.expectations() == []
        assert s.step("NOOP").startswith("200")
        assert s.step("PASV") == want
        assert s.close().endswith("BYE")
    finally:
        s.p.kill()
