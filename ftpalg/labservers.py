"""pyftpdlib server for the lab: ``python -m ftpalg.labservers ADDR ROOT [PORT]``.

Anonymous login, read/write, default security (PORT to a foreign address is refused).
"""

from __future__ import annotations

import sys

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer


def main() -> None:
    addr, root = sys.argv[1], sys.argv[2]
    port = int(sys.argv[3]) if len(sys.argv) > 3 else 21
    auth = DummyAuthorizer()
    auth.add_anonymous(root, perm="elrw")
    handler = type("LabHandler", (FTPHandler,), {"authorizer": auth, "permit_foreign_addresses": False})
    server = FTPServer((addr, port), handler)
    server.max_cons = 512
    server.serve_forever()


if __name__ == "__main__":
    main()
