"""The pure core: no I/O, no clock, no netfilterqueue/socket/subprocess/scapy imports.

packet (IP/TCP codec), addr (keys and addresses), stream (a direction's byte stream), seqadj
(edits and seq mapping), ftp (grammar), policy (what may open a pinhole), nat64 (which
connections crossed a NAT64 translator, and their translation state), session (the FTP state
machine of one control connection), events (verdicts and decisions as values), kernel (the
port to conntrack), direction / flow (one connection), pinholes (the book), actions (a line's
decision carried out), walk (one segment through its connection), alg (the table and the
entry of each packet), accounting (counters and logs from events), offline (the kernel played
offline).
"""
