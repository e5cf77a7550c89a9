#!/usr/bin/env python3
"""The minimal Python forwarder for `make bench` (item 9): what the job costs a short script.

Reads `key=value` lines from a tty (a pty in the harness), splits them, sends each as
[b"reading", json] from a pyzmq DEALER and reads the backend's acks. No spool, no retries.
Usage: py_forwarder.py TTY ENDPOINT. Sends a `hello` first; runs until killed.
"""
import json, os, sys, time
import zmq


def value(v):
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


tty, endpoint = sys.argv[1], sys.argv[2]
fd = os.open(tty, os.O_RDONLY | os.O_NOCTTY)
sock = zmq.Context().socket(zmq.DEALER)
sock.connect(endpoint)
sock.send_multipart([b"hello", b'{"gateway": "py"}'])
poller = zmq.Poller()
poller.register(fd, zmq.POLLIN)
poller.register(sock, zmq.POLLIN)
rest, seq = b"", 0
while True:
    for what, _ in poller.poll():
        if what == fd:
            *lines, rest = (rest + os.read(fd, 4096)).split(b"\n")
            for line in lines:
                pairs = (p.partition("=") for p in line.decode("utf-8", "replace").split())
                seq += 1
                body = {"gateway": "py", "seq": seq, "source": "weather", "time": time.time(),
                        "values": {k: value(v) for k, _, v in pairs}}
                sock.send_multipart([b"reading", json.dumps(body).encode()])
        else:
            while sock.poll(0):
                sock.recv_multipart()  # acks
