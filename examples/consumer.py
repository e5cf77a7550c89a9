#!/usr/bin/env python3
"""A zgate fleet consumer in one file (Python 3 + nats-py). Copy it and make it yours.

zgate-bridge puts every gateway's readings into the JetStream stream ZGATE (docs/fleet.md).
This program does the two things another program of yours does with it:

- `read`: reads the stream with a **durable pull consumer** and prints every reading as one
  JSON line, acking each after it was printed. The consumer's position lives in the NATS
  cluster under its durable name: run it again with the same --durable and it goes on after
  the last reading it acked (a reading printed but not acked when it was stopped is printed
  again: at-least-once; de-duplicate on `msg_id` if that matters to you).
- `command`: sends one command to a gateway as a NATS **request** to `zgate.<gateway>.command`
  and prints the gateway's reply. A gateway connected to no bridge gives "no responders" at
  once; this prints that and exits with status 3.

Output of `read` (stdout), one line per reading:
  {"subject": "zgate.gw-01.reading.weather", "msg_id": "gw-01:<spool_id>:42",
   "stream_seq": 1234, "reading": {"gateway": "gw-01", "seq": 42, "source": "weather", ...}}
`reading` is the body exactly as the gateway sent it (parsed); `msg_id` is the message's
`Nats-Msg-Id` header, `<gateway>:<spool_id>:<seq>`, unique per reading in the stream.

Examples:
  python3 consumer.py read --servers nats://10.0.0.1:4222,nats://10.0.0.2:4222
  python3 consumer.py read --durable billing --subject 'zgate.gw-01.reading.>' --count 100
  python3 consumer.py command gw-01 relay1 pulse '{"ms": 500}'
  python3 consumer.py command gw-01 weather write '"GO"'

Needs `pip install nats-py` (2.16 or later).
"""

import argparse
import asyncio
import json
import secrets
import sys

import nats
from nats.errors import NoRespondersError, TimeoutError as NatsTimeout

STREAM = "ZGATE"
READINGS = "zgate.*.reading.>"


async def connect(args):
    """Connects to the first reachable server of --servers; once connected, nats-py reconnects
    by itself (to any server of the cluster) for as long as the program runs."""
    seen = set()

    async def error_cb(e):
        # nats-py reports every failed attempt; say each distinct problem once.
        text = f"{type(e).__name__}: {e}"
        if text not in seen:
            seen.add(text)
            print(f"consumer: NATS: {text}", file=sys.stderr)

    opts = {"servers": args.servers.split(","), "name": "zgate-consumer",
            "max_reconnect_attempts": -1, "error_cb": error_cb}
    if args.creds:
        opts["user_credentials"] = args.creds
    try:
        return await asyncio.wait_for(nats.connect(**opts), args.connect_timeout)
    except asyncio.TimeoutError:
        raise ConnectionError(f"no NATS server reachable within {args.connect_timeout} s")


def token(name):
    """A gateway id or source name as the bridge writes it in a subject: A-Z a-z 0-9 _ - as
    they are, every other byte of the UTF-8 text as =XX (`gw.01` -> `gw=2E01`)."""
    kept = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
    t = "".join(chr(b) if b in kept else f"={b:02X}" for b in name.encode())
    return t or "="


def out(obj):
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def read(args):
    """Prints readings from the durable consumer until --count readings were printed, or the
    stream had nothing new for --idle-exit seconds (0: run until stopped)."""
    nc = await connect(args)
    try:
        js = nc.jetstream()
        # Binds to the durable when it exists, creates it (ack explicit, from the start of the
        # stream) when it does not. Its position is kept by the cluster, so a restart resumes.
        sub = await js.pull_subscribe(args.subject, durable=args.durable, stream=args.stream)
        printed = 0
        idle = 0.0
        while args.count == 0 or printed < args.count:
            want = args.batch if args.count == 0 else min(args.batch, args.count - printed)
            try:
                msgs = await sub.fetch(batch=want, timeout=1.0)
            except TimeoutError:  # nats-py raises its own or asyncio's: both are TimeoutError
                idle += 1.0
                if args.idle_exit and idle >= args.idle_exit:
                    break
                continue
            idle = 0.0
            for m in msgs:
                try:
                    reading = json.loads(m.data)
                except ValueError:
                    reading = m.data.decode("utf-8", "replace")
                out({"subject": m.subject,
                     "msg_id": (m.headers or {}).get("Nats-Msg-Id"),
                     "stream_seq": m.metadata.sequence.stream,
                     "reading": reading})
                # Ack after the reading was handled: the cluster then never hands it to this
                # durable again. Unacked readings come again after the consumer's ack wait.
                await m.ack()
                printed += 1
        print(f"consumer: {printed} readings printed (durable {args.durable!r})", file=sys.stderr)
    finally:
        await nc.close()


async def command(args):
    """Sends one command and prints the gateway's reply. Exit status: 0 reply ok, 1 reply not
    ok, 2 no reply within --timeout, 3 no gateway of that id connected to any bridge."""
    try:
        value = json.loads(args.value) if args.value is not None else None
    except ValueError:
        print(f"consumer: VALUE must be JSON (1, true, {{\"ms\": 500}}, \"text\"): "
              f"{args.value!r}", file=sys.stderr)
        return 64
    # Ids must be unique forever per gateway: the gateway answers a known id from its cache.
    cmd = {"id": args.id or f"py-{secrets.token_hex(6)}-1", "target": args.target,
           "action": args.action}
    if value is not None:
        cmd["value"] = value
    subject = f"zgate.{token(args.gateway)}.command"
    nc = await connect(args)
    try:
        try:
            resp = await nc.request(subject, json.dumps(cmd).encode(), timeout=args.timeout)
        except NoRespondersError:
            print(f"consumer: gateway {args.gateway!r} is not connected to any bridge "
                  f"(no responders on {subject}); command {cmd['id']} not sent",
                  file=sys.stderr)
            return 3
        except NatsTimeout:
            # The command may still run: send it again with the same id to learn its reply
            # (the gateway runs an id once and answers a repeat from its cache).
            print(f"consumer: no reply to {cmd['id']} from {args.gateway!r} within "
                  f"{args.timeout} s; send it again with --id {cmd['id']}", file=sys.stderr)
            return 2
        reply = json.loads(resp.data)
        out({"gateway": args.gateway, "command": cmd, "reply": reply})
        return 0 if reply.get("ok") else 1
    finally:
        await nc.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default="nats://127.0.0.1:4222",
                   help="NATS URLs, comma-separated (default %(default)s)")
    p.add_argument("--creds", default="", help="NATS credentials file")
    p.add_argument("--connect-timeout", type=float, default=10.0,
                   help="seconds to wait for the first connection (default %(default)s)")
    sub = p.add_subparsers(dest="what", required=True)

    r = sub.add_parser("read", help="print readings from a durable pull consumer")
    r.add_argument("--stream", default=STREAM)
    r.add_argument("--durable", default="zgate-consumer",
                   help="the consumer's durable name: its position is kept under it")
    r.add_argument("--subject", default=READINGS, help="filter (default %(default)s)")
    r.add_argument("--batch", type=int, default=256, help="readings per fetch")
    r.add_argument("--count", type=int, default=0, help="stop after N readings (0: never)")
    r.add_argument("--idle-exit", type=float, default=0,
                   help="stop after S seconds without a new reading (0: never)")

    c = sub.add_parser("command", help="send one command, print the reply")
    c.add_argument("gateway")
    c.add_argument("target")
    c.add_argument("action", help="set, toggle, pulse or write")
    c.add_argument("value", nargs="?", help='JSON: 1, true, {"ms": 500}, "text"')
    c.add_argument("--id", default="", help="command id (default: random, unique)")
    c.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the reply")

    args = p.parse_args()
    try:
        if args.what == "read":
            asyncio.run(read(args))
            return 0
        return asyncio.run(command(args))
    except KeyboardInterrupt:
        return 130
    except (OSError, nats.errors.Error) as e:
        print(f"consumer: {type(e).__name__}: {e} (servers {args.servers})", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
