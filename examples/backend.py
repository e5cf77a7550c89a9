#!/usr/bin/env python3
"""A complete zgate backend in one file (Python 3 + pyzmq). Copy it and make it yours.

It follows docs/protocol.md, "Writing a backend":
- binds a ROUTER with ZMQ_ROUTER_HANDOVER, ZMQ_ROUTER_MANDATORY and ZMTP heartbeats;
- with --secret-key and --allow it is a CURVE server: a ZAP handler accepts a gateway only when
  its public key is in DIR/<gateway-id>.pub, and every message whose routing id is not that id
  is dropped;
- answers every hello at once, prints every new reading as one JSON line, then acks the highest
  seq up to which it holds every reading (duplicates are not printed again, but re-acked);
  de-duplicates on (gateway, spool_id, seq);
- sends commands read from stdin (or --commands FILE), one per line:
      GATEWAY TARGET ACTION [VALUE]        e.g.  gw-01 relay1 pulse {"ms": 500}
      {"gateway": "gw-01", "command": {"target": "relay1", "action": "set", "value": 1}}
  VALUE is JSON (1, true, {"ms": 500}); for `write` it is the rest of the line, as text.
  Each command gets an id unique across runs (random prefix + counter), waits for its gateway
  when that is not connected, is sent again after every hello of that gateway until its reply
  arrives (the gateway runs an id once and answers repeats from its cache), and is given up
  after --command-timeout seconds.

Output (stdout, or --out FILE): one JSON object per line, what the gateways sent plus "kind":
  {"kind": "reading", "gateway": "gw-01", "seq": 1, "source": "weather", ...}
  {"kind": "reply", "gateway": "gw-01", "id": "py-5f0c3a9e21d8-1", "ok": true, "command": {...}}
hello and stats lines too. A reading made while the gateway's clock was not synchronised
("clock": "unsynced") gets "time_corrected" once a synced hello/stats of its boot came, or a
later line {"kind": "time_corrected", "gateway", "spool_id", "seq", "source", "time_corrected"}.
Diagnostics go to stderr.

Examples:
  zgate keygen --out server                  # server.key; server.pub goes to every gateway
  mkdir allow && cp gateway.pub allow/gw-01.pub  # a gateway's public key, named by its id
  python3 backend.py --bind tcp://0.0.0.0:5555 --secret-key server.key --allow allow
  echo 'gw-01 relay1 pulse {"ms": 500}' | python3 backend.py --bind tcp://127.0.0.1:5555

The ledger lives in memory: a restarted backend prints again the readings the gateways resend
(at-least-once). To get exactly-once across restarts, store (gateway, spool_id, high) in the
same transaction as the readings, and load it at start.
"""

import argparse
import calendar
import json
import logging
import os
import re
import secrets
import sys
import time
from pathlib import Path

import zmq
from zmq.utils import z85

PROTOCOL = 1                              # the protocol version this backend implements
ZAP_ENDPOINT = "inproc://zeromq.zap.01"   # where libzmq asks for authentication (RFC 27)
MAX_AHEAD = 100_000                       # out-of-order seqs remembered per gateway
log = logging.getLogger("backend")


# ------------------------------------------------------------------ CURVE: keys and ZAP

def load_secret_key(path):
    """A `zgate keygen` secret key file: 40 Z85 characters on one line. The key rule of
    docs/security.md: owned by root or by us, mode 0640 or stricter, group-readable only by
    our own group."""
    try:
        st = os.stat(path)
        key = Path(path).read_text().strip()
    except OSError as e:
        sys.exit(f"cannot read secret key file {path}: {e}")
    mode = st.st_mode & 0o7777
    if st.st_uid not in (0, os.geteuid()) or mode & ~0o640 \
            or (mode & 0o040 and st.st_gid != os.getegid()):
        sys.exit(f"secret key file {path} (mode {mode:04o}) could be read or changed by others: "
                 f"chmod 600 {path}")
    try:
        if len(z85.decode(key)) != 32:
            raise ValueError
    except (KeyError, ValueError):  # a character outside Z85, or the wrong length
        sys.exit(f"secret key file {path}: not a 40-character Z85 CURVE key")
    return key.encode()


def allowed_ids(allow_dir, client_key):
    """The ids whose DIR/<id>.pub holds client_key. Read at every handshake: adding or deleting
    a file takes effect for the next connection, without a restart."""
    ids = []
    for path in sorted(Path(allow_dir).glob("*.pub")):
        try:
            if path.read_text().strip() == client_key:
                ids.append(path.stem)
        except OSError as e:
            log.warning("allow list: skipping %s: %s", path, e)
    return ids


def serve_zap(zap, allow_dir):
    """Answers one ZAP request. The user id of an accepted connection is the gateway id: libzmq
    attaches it to every message of that connection as the `User-Id` property."""
    req = zap.recv_multipart()
    status, text, user = b"400", "", ""
    if len(req) < 6 or req[0] != b"1.0":
        status, text = b"500", "malformed ZAP request"
    elif req[5] != b"CURVE" or len(req) < 7:
        text = "CURVE required"
    else:
        key = z85.encode(req[6]).decode()
        ids = allowed_ids(allow_dir, key)
        if len(ids) == 1:
            status, text, user = b"200", "OK", ids[0]
        elif not ids:
            text = f"key {key} is not in the allow list"
        else:
            text = f"key {key} is registered under several ids ({', '.join(ids)})"
    peer = req[3].decode(errors="replace") if len(req) > 3 else "?"
    if status == b"200":
        log.info("gateway authenticated gateway=%s peer=%s", user, peer)
    else:
        log.warning("connection rejected peer=%s reason=%r", peer, text)
    request_id = req[1] if len(req) > 1 else b""
    zap.send_multipart([b"1.0", request_id, status, text.encode(), user.encode(), b""])


def prop(frame, name):
    """A message property libzmq attached to a received frame, or None."""
    try:
        return frame.get(name)
    except zmq.ZMQError:
        return None


# ------------------------------------------------------------------ readings: the ledger

class Ledger:
    """What one gateway's current spool delivered: every seq <= high was received, `ahead` holds
    received seqs above a gap. Seqs are numbers within one spool (spool_id): a gateway whose
    spool was replaced starts again at 1 under a new spool_id, and gets a fresh ledger."""

    def __init__(self, spool_id):
        self.spool_id = spool_id
        self.high = 0
        self.ahead = set()
        # The highest seq the gateway may have sent on its current connection: it refuses an
        # ack above that, so acks never go higher (right after a hello: resume_seq - 1).
        self.sent_high = 0

    def skip_to(self, resume_seq):
        """Everything below resume_seq was acked or dropped at the gateway: stop waiting."""
        if resume_seq - 1 > self.high:
            self.high = resume_seq - 1
            self.ahead = {s for s in self.ahead if s > self.high}
        self._advance()

    def receive(self, seq):
        """Records a reading; False for a duplicate (already received: do not store it again)."""
        self.sent_high = max(self.sent_high, seq)
        if seq <= self.high or seq in self.ahead:
            return False
        self.ahead.add(seq)
        self._advance()
        while len(self.ahead) > MAX_AHEAD:  # bounded (a forgotten seq, if resent, is stored
            self.ahead.remove(min(self.ahead))  # again: at-least-once, never lost)
        return True

    def _advance(self):
        while self.high + 1 in self.ahead:
            self.ahead.remove(self.high + 1)
            self.high += 1

    def ack_seq(self):
        return min(self.high, self.sent_high)


# ------------------------------------------------------------------ honest timestamps

MAX_UNDATED = 100_000                     # unsynced readings kept per gateway, waiting


class Redater:
    """Dates readings made while the gateway's clock was not synchronised. Such a reading has
    "clock": "unsynced", "mono_ms" and "boot_id"; a hello or stats with "clock": "synced" of the
    same boot pairs a right "time" with its "mono_ms", and then
    true_time = synced_time - (synced_mono_ms - reading_mono_ms)."""

    def __init__(self):
        self.synced = {}   # (gateway, boot_id) -> (synced time in ms, its mono_ms)
        self.waiting = {}  # gateway -> [reading body, ...] (oldest first, bounded)

    @staticmethod
    def date(pair, mono_ms):
        ms = pair[0] - (pair[1] - mono_ms)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + ".%03dZ" % (ms % 1000)

    def on_reading(self, gateway, body):
        """The reading's "time_corrected", None when it needs none or must wait for a pair."""
        if body.get("clock") != "unsynced":
            return None
        pair = self.synced.get((gateway, body.get("boot_id")))
        if pair is not None:
            return self.date(pair, body["mono_ms"])
        waiting = self.waiting.setdefault(gateway, [])
        waiting.append(body)
        del waiting[:-MAX_UNDATED]
        return None

    def on_status(self, gateway, body):
        """A hello or stats: the readings it dates, as (reading body, time_corrected)."""
        if body.get("clock") != "synced" or not isinstance(body.get("mono_ms"), int):
            return []
        try:  # "2026-12-03T06:10:00.123Z"
            ms = calendar.timegm(time.strptime(body["time"][:19], "%Y-%m-%dT%H:%M:%S")) * 1000 \
                + int(body["time"][20:23])
        except (KeyError, ValueError, TypeError):
            return []
        boot = body.get("boot_id")
        pair = self.synced[(gateway, boot)] = (ms, body["mono_ms"])
        waiting = self.waiting.get(gateway, [])
        self.waiting[gateway] = [r for r in waiting if r.get("boot_id") != boot]
        return [(r, self.date(pair, r["mono_ms"])) for r in waiting if r.get("boot_id") == boot]


# ------------------------------------------------------------------ commands

def parse_command(line):
    """`GATEWAY TARGET ACTION [VALUE]` or `{"gateway": ..., "command": {...}}` -> (gw, dict)."""
    if line.startswith("{"):
        d = json.loads(line)
        if not isinstance(d, dict) or not isinstance(d.get("gateway"), str) \
                or not isinstance(d.get("command"), dict):
            raise ValueError('expected {"gateway": ID, "command": {...}}')
        return d["gateway"], dict(d["command"])
    parts = line.split(None, 3)
    if len(parts) < 3:
        raise ValueError("expected GATEWAY TARGET ACTION [VALUE]")
    gateway, target, action = parts[:3]
    command = {"target": target, "action": action}
    if len(parts) == 4:
        command["value"] = parts[3] if action == "write" else json.loads(parts[3])
    return gateway, command


# ------------------------------------------------------------------ the backend

class Backend:
    def __init__(self, args):
        self.args = args
        ctx = zmq.Context.instance()
        self.zap = None
        self.sock = ctx.socket(zmq.ROUTER)
        # A gateway that reconnects comes back with the same routing id while its old pipe may
        # still be alive here: with handover the new connection takes over (without it, the
        # ROUTER ignores the new connection). Heartbeats drop dead connections.
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 10_000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 30_000)
        # A send to a gateway that is not connected fails (EHOSTUNREACH) instead of vanishing.
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        if args.secret_key:
            secret = load_secret_key(args.secret_key)
            if not Path(args.allow).is_dir():
                sys.exit(f"--allow {args.allow}: not a directory")
            # The ZAP handler must exist before the ROUTER accepts anyone: without it libzmq
            # accepts every CURVE client.
            self.zap = ctx.socket(zmq.REP)
            self.zap.setsockopt(zmq.LINGER, 0)
            self.zap.bind(ZAP_ENDPOINT)
            self.sock.curve_server = True
            self.sock.curve_secretkey = secret
            self.sock.zap_domain = b"zgate"
            log.info("CURVE on: backend public key %s (the gateways' backend.server_public_key)",
                     zmq.curve_public(secret).decode())
        elif re.match(r"tcp://(?!127\.|localhost:|\[::1\])", args.bind):
            log.warning("INSECURE: %s is plaintext: anyone on the network can read and forge "
                        "readings and commands; use --secret-key and --allow", args.bind)
        try:
            self.sock.bind(args.bind)
        except zmq.ZMQError as e:
            sys.exit(f"cannot bind {args.bind}: {e}")
        self.out = open(args.out, "a") if args.out else sys.stdout
        self.ledgers = {}      # gateway id -> Ledger
        self.redater = Redater()
        self.unsupported = {}  # gateway id -> protocol of its last hello, when not PROTOCOL
        self.impostor = {}     # CURVE: routing id -> key owner of its last message, when foreign
        self.pending = {}      # command id -> {"gateway", "command", "since", "state"}
        self.prefix = f"py-{secrets.token_hex(6)}"  # random per run: ids never repeat
        self.counter = 0
        self.inbuf = b""

    def emit(self, kind, gateway, body):
        """One output line. "gateway" is the routing id (with CURVE: checked against the key)."""
        line = {"kind": kind, "gateway": gateway}
        line.update((k, v) for k, v in body.items() if k != "gateway")
        self.out.write(json.dumps(line) + "\n")

    def emit_corrections(self, gateway, body):
        """The readings a synced hello/stats dates: one "time_corrected" line each."""
        for r, t in self.redater.on_status(gateway, body):
            self.emit("time_corrected", gateway, {"spool_id": self.ledgers[gateway].spool_id
                      if gateway in self.ledgers else "", "seq": r.get("seq"),
                      "source": r.get("source"), "time_corrected": t})

    def sender_ok(self, frames):
        """With CURVE: the routing id must be the id the sender's key is registered under."""
        if self.zap is None:
            return True
        gateway = frames[0].bytes.decode(errors="replace")
        user = prop(frames[1], "User-Id")  # what our ZAP handler named this connection
        if user == gateway:
            self.impostor.pop(gateway, None)
            return True
        self.impostor[gateway] = user
        log.warning("message dropped: routing id %r but the key is registered as %r "
                    "(impersonation) peer=%s", gateway, user, prop(frames[1], "Peer-Address"))
        return False

    def on_message(self, frames, to_ack):
        if len(frames) != 3:
            log.warning("ignored a message of %d frames (expected id, kind, JSON)", len(frames))
            return
        if not self.sender_ok(frames):
            return
        gateway = frames[0].bytes.decode(errors="replace")
        kind = frames[1].bytes.decode(errors="replace")
        try:
            body = json.loads(frames[2].bytes)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError as e:
            log.warning("gateway=%s %s: bad JSON body: %s", gateway, kind, e)
            return
        if kind == "hello":
            self.on_hello(gateway, body, to_ack)
        elif gateway in self.unsupported:
            return  # not understood: neither stored nor acked (the gateway keeps it)
        elif kind == "reading":
            seq = body.get("seq")
            if not isinstance(seq, int) or seq < 1:
                log.warning("gateway=%s reading without a valid seq: %s", gateway, body)
                return
            ledger = self.ledgers.get(gateway)
            if ledger is None:  # no hello seen (cannot happen with zgate): start here
                ledger = self.ledgers[gateway] = Ledger(None)
                ledger.skip_to(seq)
            if ledger.receive(seq):
                corrected = self.redater.on_reading(gateway, body)
                self.emit("reading", gateway, {**body, **({"time_corrected": corrected}
                                                          if corrected else {})})
            to_ack.add(gateway)  # duplicates too: the gateway may have missed our last ack
        elif kind == "reply":
            cid = body.get("id")
            sent = self.pending.pop(cid, None) if isinstance(cid, str) else None
            self.emit("reply", gateway, {**body, **({"command": sent["command"]} if sent else {})})
        else:
            ledger, resume = self.ledgers.get(gateway), body.get("resume_seq")
            spool = body.get("spool")
            if kind == "stats" and ledger and isinstance(resume, int) \
                    and isinstance(spool, dict) and spool.get("spool_id") == ledger.spool_id:
                high = ledger.high
                ledger.skip_to(resume)  # readings below were dropped at the gateway
                if ledger.high != high:
                    to_ack.add(gateway)  # the readings after the gap can be acked now
            self.emit(kind, gateway, body)  # stats, and kinds added later: print them
            if kind == "stats":
                self.emit_corrections(gateway, body)

    def on_hello(self, gateway, body, to_ack):
        protocol = body.get("protocol")
        if protocol != PROTOCOL:
            # Do not guess: ack nothing (an ack deletes readings at the gateway), store
            # nothing. The gateway keeps its readings and reconnects later.
            self.unsupported[gateway] = protocol
            log.error("gateway=%s speaks protocol %r; this backend knows %d only: ignoring it "
                      "(nothing acked) until it says hello with protocol %d",
                      gateway, protocol, PROTOCOL, PROTOCOL)
            return
        self.unsupported.pop(gateway, None)
        spool_id = body.get("spool_id", "")
        resume = body.get("resume_seq")
        if not isinstance(resume, int) or resume < 1:
            resume = 1
        ledger = self.ledgers.get(gateway)
        if ledger is None or ledger.spool_id != spool_id:
            if ledger is not None:
                log.warning("gateway=%s spool_id changed %s -> %s: its spool was replaced; "
                            "fresh ledger, seqs from %d on are new readings",
                            gateway, ledger.spool_id, spool_id, resume)
            ledger = self.ledgers[gateway] = Ledger(spool_id)
        ledger.skip_to(resume)
        ledger.sent_high = resume - 1  # a new connection: nothing sent on it yet
        log.info("hello gateway=%s spool_id=%s resume_seq=%d", gateway, spool_id, resume)
        self.emit("hello", gateway, body)
        self.emit_corrections(gateway, body)
        to_ack.add(gateway)  # answer every hello at once
        # A command in flight when the last connection died may be lost: send it again (same
        # id: the gateway never runs an id twice, it answers from its cache).
        for p in self.pending.values():
            if p["gateway"] == gateway:
                p["state"] = "send"

    def send_ack(self, gateway):
        try:
            self.sock.send_multipart([gateway.encode(), b"ack", json.dumps(
                {"seq": self.ledgers[gateway].ack_seq()}).encode()], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # gone, or its queue is full: its next hello is answered
            log.debug("gateway=%s: ack not sent: %s", gateway, e)

    def on_input_line(self, line):
        line = line.strip()
        if not line or line.startswith("#"):
            return
        try:
            gateway, command = parse_command(line)
        except ValueError as e:
            log.error("command line %r refused: %s", line, e)
            return
        if "id" not in command:
            self.counter += 1
            command["id"] = f"{self.prefix}-{self.counter}"
        self.pending[command["id"]] = {"gateway": gateway, "command": command,
                                       "since": time.monotonic(), "state": "send"}

    def send_pending(self):
        """Sends each command in state "send"; gives up those without a reply in time."""
        now = time.monotonic()
        for cid, p in list(self.pending.items()):
            gateway = p["gateway"]
            if now - p["since"] > self.args.command_timeout:
                del self.pending[cid]
                log.error("command id=%s gateway=%s: no reply within %s s: given up",
                          cid, gateway, self.args.command_timeout)
            elif gateway in self.impostor:
                del self.pending[cid]
                log.error("command id=%s not sent: routing id %s was last used with the key of "
                          "%s (impersonation)", cid, gateway, self.impostor[gateway])
            elif p["state"] == "send" and gateway not in self.unsupported:
                try:
                    self.sock.send_multipart([gateway.encode(), b"command",
                                              json.dumps(p["command"]).encode()], zmq.NOBLOCK)
                    p["state"] = "sent"
                    log.info("command sent id=%s gateway=%s", cid, gateway)
                except zmq.Again:
                    pass  # its queue is full: again at the next turn
                except zmq.ZMQError as e:
                    if e.errno != zmq.EHOSTUNREACH:
                        raise
                    p["state"] = "wait"  # not connected (ROUTER_MANDATORY): until its hello
                    log.info("command id=%s waits for gateway=%s to connect", cid, gateway)

    def read_input(self, fd):
        """Reads what is there and handles every complete line. False at end of input."""
        data = os.read(fd, 65536)
        self.inbuf += data
        *lines, self.inbuf = self.inbuf.split(b"\n")
        if not data and self.inbuf:
            lines, self.inbuf = lines + [self.inbuf], b""
        if len(self.inbuf) > 65536:
            log.error("command line over 64 KiB: discarded")
            self.inbuf = b""
        for line in lines:
            self.on_input_line(line.decode(errors="replace"))
        return bool(data)

    def run(self):
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if self.zap is not None:
            poller.register(self.zap, zmq.POLLIN)
        fd = None
        if self.args.commands == "-":
            fd = sys.stdin.fileno()
        elif self.args.commands != "none":
            try:
                fd = os.open(self.args.commands, os.O_RDONLY)
            except OSError as e:
                sys.exit(f"--commands: {e}")
        if fd is not None:
            poller.register(fd, zmq.POLLIN)
        log.info("listening bind=%s", self.args.bind)
        while True:
            events = dict(poller.poll(1000))
            if self.zap is not None and self.zap in events:
                serve_zap(self.zap, self.args.allow)
            if fd is not None and fd in events and not self.read_input(fd):
                poller.unregister(fd)
                fd = None
            to_ack = set()
            try:
                while True:  # everything available now, then one ack per gateway
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.on_message(frames, to_ack)
                # Ack only what is stored: flush (and fsync a file) first.
                self.out.flush()
                if to_ack and self.out is not sys.stdout:
                    os.fsync(self.out.fileno())
            except OSError as e:
                sys.exit(f"cannot write the output ({e}): stopping, nothing more acked")
            for gateway in to_ack:
                self.send_ack(gateway)
            self.send_pending()


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See docs/protocol.md, \"Writing a backend\".")
    p.add_argument("--bind", required=True, help="e.g. tcp://0.0.0.0:5555 or ipc:///run/zg")
    p.add_argument("--secret-key", metavar="FILE", help="CURVE: this backend's secret key "
                   "(zgate keygen); needs --allow")
    p.add_argument("--allow", metavar="DIR", help="CURVE: the allowed gateways, one "
                   "<gateway-id>.pub file each (as zgate keygen writes them)")
    p.add_argument("--commands", metavar="FILE", default="-",
                   help="where commands come from: a file, a FIFO, - for stdin (default), none")
    p.add_argument("--out", metavar="FILE", help="append the JSON lines here, not to stdout")
    p.add_argument("--command-timeout", type=float, default=30.0, metavar="S",
                   help="give a command up when no reply came within S seconds (default 30)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args()
    if bool(args.secret_key) != bool(args.allow):
        p.error("--secret-key and --allow go together")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        Backend(args).run()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
