#!/usr/bin/env python3
"""Where a closed listener's queue goes with net.ipv4.tcp_migrate_req=1 when
more than one other socket is left in its SO_REUSEPORT group.

    unshare --net python3 bench/migrate_by_hash.py [--connections N] [--rounds R]

In a network namespace of its own (it sets the sysctl there, and brings lo
up): three listening sockets on one port, in one group, a one-instruction
BPF program steering every new connection to the third, as the daemon
steers to the serving generation; N connections queue on the third, which
is then closed.  The kernel moves its queue by hash among the sockets left,
not by the program: it prints how many landed on each of the other two.
"""
import argparse
import array
import fcntl
import os
import socket
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from socketprotector import _BPF_RET_K, _SO_ATTACH_REUSEPORT_CBPF, _backlog_length  # noqa: E402


def loopback_up():
    with socket.socket() as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, request))[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", flags | 1))


def one_round(connections):
    socks = []
    try:
        for _ in range(3):
            s = socket.socket()
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", socks[0].getsockname()[1] if len(socks) > 1 else 0))
            s.listen(connections)
        code = array.array("B", struct.pack("=HBBI", _BPF_RET_K, 0, 0, 2))
        socks[2].setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF,
                            struct.pack("@HP", 1, code.buffer_info()[0]))
        clients = [socket.create_connection(socks[0].getsockname(), timeout=5)
                   for _ in range(connections)]
        try:
            assert _backlog_length(socks[2]) == connections, "not all steered to the third"
            socks.pop().close()
            return [_backlog_length(s) for s in socks]
        finally:
            for c in clients:
                c.close()
    finally:
        for s in socks:
            s.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    loopback_up()
    with open("/proc/sys/net/ipv4/tcp_migrate_req", "w") as f:
        f.write("1")
    landed = [0, 0]
    for _ in range(args.rounds):
        for i, n in enumerate(one_round(args.connections)):
            landed[i] += n
    print(f"{args.rounds} rounds of {args.connections} connections queued on the third "
          f"socket, closed: {landed[0]} landed on the first, {landed[1]} on the second")


if __name__ == "__main__":
    main()
