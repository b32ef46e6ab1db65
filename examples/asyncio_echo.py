#!/usr/bin/env python3
"""An asyncio echo server on socketprotector's serve_connections().

    python3 socketprotector.py -f 4321 -- python3 examples/asyncio_echo.py 4321

Each connection is an asyncio stream pair handed to echo(), in a task of
its own.  When socketprotector retires this process, serve_connections()
stops taking connections, waits for the open ones to finish, and returns.
Run on its own (python3 examples/asyncio_echo.py 4321) it listens itself.

Your own asyncio loop can do the same by hand: add_reader() on a
ConnectionReceiver's fileno(), call receive() when it is readable, and hand
each socket to asyncio.open_connection(sock=...) or loop.connect_accepted_socket().
"""

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from socketprotector import SocketProtectorError, serve_connections  # noqa: E402


async def echo(reader, writer):
    while True:
        data = await reader.read(65536)
        if not data:
            return
        writer.write(data)
        await writer.drain()


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else None
    try:
        asyncio.run(serve_connections(echo, port))
    except SocketProtectorError as e:
        print(f"asyncio_echo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
