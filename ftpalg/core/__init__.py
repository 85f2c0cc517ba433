"""The pure core: no I/O, no clock, no netfilterqueue/socket/subprocess/scapy imports.

packet (IP/TCP codec), stream (a direction's byte stream), seqadj (edits and seq mapping),
ftp (grammar), policy (what may open a pinhole), session (the FTP state machine of one control
connection), table (the connection table and the per-packet walk).
"""
