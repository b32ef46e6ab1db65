#!/usr/bin/env python3
"""The benchmark's server: a single-threaded selectors echo server.

It uses ConnectionReceiver, so the same code runs through socketprotector
and on its own (`python3 bench/echo_server.py PORT`).  If the file named by
$BENCH_READY_DELAY_FILE exists, it first sleeps the seconds it holds (a slow
new build).  $BENCH_WORK_US makes each request burn that many microseconds
of pure Python first (a CPU-bound application).  With
$BENCH_PROTOCOL=original it takes its connections the way the C++ original
(github.com/kdt3rd/SocketProtector) hands them over instead, for the
benchmark's reference row.
"""

import os
import selectors
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from socketprotector import ConnectionReceiver  # noqa: E402


class OriginalReceiver:
    """The C++ original's child side: connect to its abstract socket
    "sock_srv_PORT" (padded with NULs to the whole sun_path, as it binds it),
    receive one descriptor per one-byte message, and clear the TCP_CORK each
    connection inherits from its listener."""

    ended = False

    def __init__(self, port):
        name = f"sock_srv_{port}".encode()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(b"\0" + name.ljust(107, b"\0"))
        self._sock.setblocking(False)

    def fileno(self):
        return self._sock.fileno()

    def receive(self):
        conns = []
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self._sock, 1, 1)
            except BlockingIOError:
                return conns
            if not data:
                self.ended = True
                return conns
            for fd in fds:
                conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
                conns.append(conn)

    def close(self):
        self._sock.close()


def main():
    delay_file = os.environ.get("BENCH_READY_DELAY_FILE")
    if delay_file and os.path.exists(delay_file):
        with open(delay_file) as f:
            time.sleep(float(f.read()))
    work = float(os.environ.get("BENCH_WORK_US", "0")) / 1e6
    sel = selectors.DefaultSelector()
    if os.environ.get("BENCH_PROTOCOL") == "original":
        receiver = OriginalReceiver(int(sys.argv[1]))
    else:
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
