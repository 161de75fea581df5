"""What one hand-off between two processes costs on this machine: Redis ``PING`` round trips.

    .venv/bin/python bench/wakeup.py --pings 1000 --blocks 10

A private ``redis-server`` and this client, one ``PING`` at a time on one connection
(``TCP_NODELAY``), in three placements, each with a fresh server:

* ``same``: both pinned to CPU 0, so each hand-off is a context switch on one CPU;
* ``split``: the server on CPU 0, the client on CPU 1, so each hand-off wakes the other CPU
  (on a VM, an idle vCPU has to be woken through the host);
* ``free``: no pinning; the scheduler decides, and may change its mind during the run.

Prints the p50 round trip of each block of ``--pings`` calls, in order, so a change of placement
during the ``free`` run shows as a jump. A serial task (publish, the worker's read, its write,
the result read) is four such hand-offs, which is why serial latency on a small VM says more
about its wake-ups than about the code on the path.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import hiredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.redisutil import start_private_redis

PLACEMENTS = {"same": (0, 0), "split": (0, 1), "free": (None, None)}


def ping_blocks(port: int, pings: int, blocks: int) -> list[float]:
    """p50 µs of each block of ``pings`` round trips."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = hiredis.Reader()
    ping = hiredis.pack_command(("PING",))
    out = []
    try:
        for _ in range(blocks):
            lat = []
            for _ in range(pings):
                t0 = time.perf_counter()
                sock.sendall(ping)
                reply = False
                while reply is False:
                    reader.feed(sock.recv(4096))
                    reply = reader.gets()
                lat.append((time.perf_counter() - t0) * 1e6)
            out.append(statistics.median(lat))
    finally:
        sock.close()
    return out


def run(placement: str, pings: int, blocks: int) -> list[float]:
    server_cpu, client_cpu = PLACEMENTS[placement]
    everywhere = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory(prefix="sop-wakeup-") as tmp:
        proc, url = start_private_redis(Path(tmp), server_cpu)
        try:
            if client_cpu is not None:
                os.sched_setaffinity(0, {client_cpu})
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            return ping_blocks(port, pings, blocks)
        finally:
            os.sched_setaffinity(0, everywhere)
            proc.terminate()
            proc.wait(timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pings", type=int, default=1000, help="round trips per block")
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="each placement this many times")
    args = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        ap.error("needs two CPUs (the split placement)")
    for rnd in range(1, args.rounds + 1):
        for placement in PLACEMENTS:
            p50s = run(placement, args.pings, args.blocks)
            shown = " ".join(f"{v:.0f}" for v in p50s)
            print(
                f"round {rnd} {placement:5s} p50 µs per block of {args.pings}: {shown}", flush=True
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
