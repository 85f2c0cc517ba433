"""How many control-connection packets still go through user space: ftpalg in the lab's
gateway, N sessions (login, PORT + RETR, PASV + RETR, QUIT), counted by the kernel (the
queue chain's counters: every control packet of both directions; the queue's id sequence:
those sent to the queue) and by ftpalg (packets it handled, packets it changed).

    .venv/bin/python bench/queued_packets.py [--sessions N] [--queue selected|all]      (root)

Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftpalg.config import DEFAULT_QUEUE  # noqa: E402
from ftpalg.lab.lab import SERVERS, Lab  # noqa: E402

CLIENT = """
    import sys
    sys.path.insert(0, {root!r})
    from ftpalg.lab.ftpclient import LabFTP
    for i in range({n}):
        ftp = LabFTP("PORT", timeout=10)
        ftp.connect({host!r}, 21)
        ftp.login()
        ftp.retrbinary("RETR small.txt", lambda b: None)
        ftp.mode, ftp.passiveserver = "PASV", True
        ftp.retrbinary("RETR small.txt", lambda b: None)
        ftp.quit()
"""


def chain_packets(lab: Lab, chain: str) -> int:
    out = lab.ns(lab.gw, ["iptables", "-t", "mangle", "-L", chain, "-v", "-x", "-n"]).stdout
    return sum(int(line.split()[0]) for line in out.splitlines()[2:] if line.strip())


def queue_ids(lab: Lab) -> int:
    """Packets the kernel sent to ftpalg's queue (its id sequence) since it was bound."""
    text = lab.ns(lab.gw, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    return sum(int(f[7]) for f in (line.split() for line in text.splitlines()) if int(f[0]) == DEFAULT_QUEUE)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--queue", choices=("selected", "all"), default="selected")
    args = ap.parse_args()
    lab = Lab(f"fb{os.getpid()}")
    try:
        lab.up()
        p = lab.start_ftpalg("--queue", args.queue)
        for server in ("vsftpd", "pyftpdlib"):
            code = textwrap.dedent(CLIENT.format(root=str(ROOT), n=args.sessions, host=SERVERS[server]))
            lab.ns(lab.client, [sys.executable, "-c", code], timeout=600)
        total = chain_packets(lab, "FTPALG-QUEUE")  # the jump into FTPALG-CONTROL: every control packet
        queued = queue_ids(lab)
        lab.stop_ftpalg(p)
        counters = dict(re.findall(r"(\w+)=(\d+)", lab.ftpalg_log().rsplit("counters:", 1)[1]))
    finally:
        lab.down()
    n = 2 * args.sessions
    handled, changed = int(counters.get("packets", 0)), int(counters.get("rewritten_packets", 0))
    print(f"{n} sessions (login, PORT+RETR, PASV+RETR, QUIT; vsftpd and pyftpdlib), client behind NAT, "
          f"queue = {args.queue}")
    print(f"control packets through the gateway, both directions: {total} ({total / n:.1f} per session)")
    print(f"queued to ftpalg:                                   {queued} ({queued / n:.1f} per session,"
          f" {100 * queued / total:.0f} %)")
    print(f"handled by ftpalg / changed by ftpalg:             {handled} / {changed} ({changed / n:.1f} per session)")
    kernel = total - queued
    print(f"left to the kernel alone:                           {kernel} ({100 * kernel / total:.0f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
