"""The namespace lab: topologies, FTP servers and clients, the demo. Never on a production path."""
