#!/usr/bin/env python3
"""An echo server built on socketprotector's receive_connections().

    python3 socketprotector.py -f 4321 -- python3 sample_client.py 4321
    echo "Hello, World" | nc -q1 localhost 4321

Run it alone (python3 sample_client.py 4321) and it listens on the port
itself.  Each connection gets a thread; when socketprotector retires this
process, the loop ends, the open connections finish, and it exits 0.  It
logs only problems and its end; -v logs every connection too.
"""

import argparse
import logging
import signal
import sys
import threading

from socketprotector import SocketProtectorError, receive_connections

log = logging.getLogger("sample_client")


def echo(conn):
    """Echo until the client closes; one thread per connection."""
    with conn:
        try:
            peer = conn.getpeername()
            log.debug("open %s", peer)
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
        except OSError as e:        # e.g. the client reset the connection
            log.debug("connection error: %s", e.strerror or e)
            return
    log.debug("close %s", peer)


def main(argv=None):
    parser = argparse.ArgumentParser(description="An echo server for socketprotector.")
    parser.add_argument("port", type=int, nargs="?",
                        help="port to listen on when not started by socketprotector")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    args = parser.parse_args(argv)
    # One line per record, each written whole: threads never interleave them.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="sample_client[%(process)d]: %(message)s")
    try:
        for conn in receive_connections(args.port):
            threading.Thread(target=echo, args=(conn,)).start()
    except (SocketProtectorError, OSError) as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C when running on its own: take no more; a second one quits now.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    # The stream ended.  Python waits for the (non-daemon) echo threads, so
    # the open connections finish before the process exits.
    open_connections = threading.active_count() - 1
    if open_connections:
        log.info("no more connections; finishing %d open", open_connections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
