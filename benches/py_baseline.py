#!/usr/bin/env python3
"""The peer baseline for `make bench` (item 7): the sensor -> ZeroMQ job as many Raspberry Pi
users write it by hand, with pyserial and pyzmq.

Reads `key=value` lines from a serial port, sends each as a protocol-v1 style multipart
[b"reading", json] from a DEALER socket to the backend ROUTER. Sends a `hello` first so the
harness knows it is connected. Runs until killed.
"""
import argparse
import datetime
import json

import serial
import zmq


def parse_kv(text):
    values = {}
    for pair in text.replace(",", " ").split():
        key, _, value = pair.partition("=")
        if value in ("true", "false"):
            values[key] = value == "true"
            continue
        try:
            values[key] = int(value)
        except ValueError:
            try:
                values[key] = float(value)
            except ValueError:
                values[key] = value
    return values


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--serial", required=True)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--id", default="py-01")
    args = ap.parse_args()

    ser = serial.Serial(args.serial, 115200, timeout=1)
    sock = zmq.Context().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, args.id.encode())
    sock.connect(args.endpoint)
    sock.send_multipart([b"hello", json.dumps({"gateway": args.id}).encode()])
    seq = 0
    while True:
        line = ser.readline()
        text = line.decode("utf-8", "replace").strip()
        if not text:
            continue
        seq += 1
        body = {
            "gateway": args.id,
            "seq": seq,
            "source": "weather",
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "values": parse_kv(text),
        }
        sock.send_multipart([b"reading", json.dumps(body).encode()])


if __name__ == "__main__":
    main()
