#!/usr/bin/env python3
"""An echo server built on socketprotector's receive_connections().

    python3 socketprotector.py -f 4321 -- python3 sample_client.py 4321
    echo "Hello, World" | nc -q1 localhost 4321

Run it alone (python3 sample_client.py 4321) and it listens on the port
itself.  Each connection gets a thread; when socketprotector retires this
process, the loop ends, the open connections finish, and it exits 0.
"""

import os
import sys
import threading

from socketprotector import receive_connections


def log(message):
    print(f"sample_client[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def echo(conn):
    with conn:
        try:
            peer = "%s:%d" % conn.getpeername()[:2]
            log(f"open {peer}")
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
        except OSError as e:        # e.g. the client reset the connection
            log(f"error {e.strerror or e}")
            return
    log(f"close {peer}")


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else None
    for conn in receive_connections(port):
        threading.Thread(target=echo, args=(conn,)).start()
    # The stream ended.  Python waits for the (non-daemon) echo threads,
    # so the open connections finish before the process exits.
    return 0


if __name__ == "__main__":
    sys.exit(main())
