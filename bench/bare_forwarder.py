#!/usr/bin/env python3
"""A reference for the benchmark, not a product: the least a forwarder can do.

    python3 bench/bare_forwarder.py PORT COMMAND [ARG...]

It listens on 127.0.0.1:PORT, starts COMMAND with a channel as
socketprotector would, and for each connection does one accept() and one
sendmsg() of its descriptor: no restarts, no queue kept for a dying child, no
signals, no flow control.  What it costs beside the server on its own is the
price of the extra process hop itself on this machine; socketprotector's
forwarding costs that plus its own bookkeeping.
"""

import array
import os
import select
import socket
import subprocess
import sys


def main():
    port, command = int(sys.argv[1]), sys.argv[2:]
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    listener.setblocking(False)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = dict(os.environ, SOCKETPROTECTOR_FD=str(theirs.fileno()),
               SOCKETPROTECTOR_HANDOFF="forward")
    child = subprocess.Popen(command, env=env, pass_fds=[theirs.fileno()])
    theirs.close()
    header = [b"C" + bytes([listener.family])]
    rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    flags = int(socket.MSG_NOSIGNAL)
    waiter = select.epoll()
    waiter.register(listener.fileno(), select.EPOLLIN)
    try:
        while True:
            waiter.poll()
            try:
                fd, _ = listener._accept()  # one per wake-up: epoll wakes again for more
            except BlockingIOError:
                continue
            ours.sendmsg(header, [(*rights, array.array("i", [fd]))], flags)
            os.close(fd)
    finally:
        child.kill()


if __name__ == "__main__":
    main()
