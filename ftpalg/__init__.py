"""ftpalg: an FTP-aware NAT application-level gateway in user space (NFQUEUE)."""

__version__ = "0.1.0"
