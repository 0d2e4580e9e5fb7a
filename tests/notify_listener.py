#!/usr/bin/env python3
"""A stand-in for systemd's notification socket: binds a unix datagram socket at argv[1] and
appends every message received to argv[2], one per line (newlines inside a message become |)."""
import socket
import sys

sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(sys.argv[1])
with open(sys.argv[2], "a") as out:
    while True:
        data = sock.recv(65536)
        out.write(data.decode(errors="replace").rstrip("\n").replace("\n", "|") + "\n")
        out.flush()
