#!/usr/bin/env python3
"""The benchmark's server: a single-threaded selectors echo server.

It uses ConnectionReceiver, so the same code runs through socketprotector
and on its own (`python3 bench/echo_server.py PORT`).  If the file named by
$BENCH_READY_DELAY_FILE exists, it first sleeps the seconds it holds (a slow
new build).  $BENCH_WORK_US makes each request burn that many microseconds
of pure Python first (a CPU-bound application).
"""

import os
import selectors
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from socketprotector import ConnectionReceiver  # noqa: E402


def main():
    delay_file = os.environ.get("BENCH_READY_DELAY_FILE")
    if delay_file and os.path.exists(delay_file):
        with open(delay_file) as f:
            time.sleep(float(f.read()))
    work = float(os.environ.get("BENCH_WORK_US", "0")) / 1e6
    sel = selectors.DefaultSelector()
    receiver = ConnectionReceiver(int(sys.argv[1]), host="127.0.0.1")
    sel.register(receiver, selectors.EVENT_READ)
    while len(sel.get_map()):
        for key, _ in sel.select():
            if key.fileobj is receiver:
                for conn in receiver.receive():
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
                if receiver.ended:
                    sel.unregister(receiver)
                    receiver.close()
                continue
            conn = key.fileobj
            try:
                data = conn.recv(65536)
                if data:
                    if work:
                        end = time.perf_counter() + work
                        while time.perf_counter() < end:
                            pass
                    conn.send(data)
                    continue
            except OSError:
                pass
            sel.unregister(conn)
            conn.close()


if __name__ == "__main__":
    main()
