"""Linux adapters: the NFQUEUE loop, conntrack look-ups and firewall rules. No FTP parsing
and no policy here."""
