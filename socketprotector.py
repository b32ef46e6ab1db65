#!/usr/bin/env python3
"""Keep a TCP port answering while the server behind it restarts.

socketprotector owns a listening TCP port and hands every connection it
accepts to a child process: your server.  On SIGHUP it starts a new child,
waits until that child is ready, sends it every new connection, and lets the
old child finish the connections it already has.  A new build that fails to
start never takes the service down: the old child keeps serving.

Command line::

    python3 socketprotector.py [options] PORT -- COMMAND [ARG...]
    python3 socketprotector.py -f 4321 -- python3 sample_client.py 4321

The child needs one call::

    from socketprotector import receive_connections

    for conn in receive_connections(4321):   # port used only without the daemon
        handle(conn)                          # a connected, blocking socket

Channel protocol: each child inherits one end of a private AF_UNIX
SOCK_SEQPACKET socketpair, its descriptor number in $SOCKETPROTECTOR_FD and
the hand-off mode in $SOCKETPROTECTOR_HANDOFF.  The child sends b"R" + uint16
(big-endian) once: ready, and the most connections it takes in one message.
Forwarding, the daemon sends b"C" + the address family (one byte) with up to
that many connections as SCM_RIGHTS descriptors, and closes its own.  The
daemon keeps the child's end of the pair open too, so what the child has not
yet received stays in that queue, the daemon's: if the child dies or hangs
up, the daemon takes it back and gives it to the next child.  No message
acknowledges anything; the kernel's queue is the ledger.  The child receives
a message only once it has room for all of its descriptors (it peeks first);
without room it sends b"N" and takes nothing until b"K": meanwhile the daemon
takes the queue back and sends it again in smaller messages.  In listener
mode the daemon sends b"L" with its listening socket once the child is
ready, and b"D" at shutdown ("accept the backlog before you let go").  End
of stream from the daemon means "take no more": the child finishes and
exits.  A child that stops receiving shuts down its end for writing.

Activation mode (--handoff activation) needs no library at all: the child
gets listening sockets as descriptors 3.. with LISTEN_FDS and LISTEN_PID,
as systemd passes them, and is ready when it sends sd_notify READY=1, or
is seen waiting on its socket (epoll or accept(), read from /proc), or
after --ready-delay.  Each generation after the first gets sockets of its
own, and new connections go to the serving generation's (SO_REUSEPORT and
a classic BPF program).  -n N runs N workers per generation.

Signals: HUP restarts (start-first), TERM/INT shut down gracefully (twice:
at once), USR1 reopens --log-file, USR2 re-executes the socketprotector.py
now on disk in this same process, keeping listeners, children and queues
(--upgrade waits for it), TTIN/TTOU add or remove a worker.  --status
prints the status line (--json: a versioned JSON document; --format
prometheus: Prometheus text for node_exporter's textfile collector).

Exit codes: 0 after a clean shutdown, 1 for a runtime failure (port in use,
command not found, first child failed to start), 2 for bad usage.
"""

from __future__ import annotations

__all__ = [
    "ConnectionReceiver",
    "ProtocolError",
    "SocketProtectorError",
    "UsageError",
    "main",
    "receive_connections",
    "serve_connections",
]
__version__ = "1.0.0"

import argparse
import array
import collections
import enum
import errno
import fcntl
import functools
import grp
import json
import logging
import logging.handlers
import math
import os
import pwd
import re
import resource
import select
import shutil
import signal
import socket
import stat
import struct
import sys
import termios
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

ENV_FD = "SOCKETPROTECTOR_FD"
ENV_HANDOFF = "SOCKETPROTECTOR_HANDOFF"     # "forward" or "listener"
ENV_WORKER = "SOCKETPROTECTOR_WORKER"       # the child's worker slot, 0..N-1

_MSG_READY = b"R"          # + uint16: the most connections the child takes at once
_MSG_NACK = b"N"           # no room for the descriptors at the head of my queue
_MSG_RESUME = b"K"         # the daemon took the queue back: receive again
_MSG_CONNS = b"C"
_MSG_LISTENER = b"L"
_MSG_DRAIN = b"D"          # listener mode, at shutdown: accept the backlog before letting go

_MAX_BATCH = 64            # descriptors per message; the receiver makes room for this many
_CHANNEL_SNDBUF = 16384    # bounds the messages queued to a child (about 40 here)
_MAX_WAITING = 256         # accepted connections the daemon queues before it stops accepting
_ACCEPT_PAUSE = 0.1        # seconds to stop accepting after EMFILE and the like
_NACK_PAUSE = 0.1          # seconds before a child that could not receive is sent more
_MAX_ACCEPT_ERRORS = 64    # failed accepts in a row before pausing (a listener that only fails)

# accept(2): errors of one connection, already gone; the next one may be fine.
# Linux reports the new connection's pending network errors through accept.
_ACCEPT_SKIP = frozenset({
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
    errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH,
    errno.ETIMEDOUT})
# Out of descriptors or memory: the connection stays in the backlog; retry later.
_ACCEPT_SHORT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_DEFAULT_READY_TIMEOUT = 30.0
_DEFAULT_STOP_TIMEOUT = 10.0
_DEFAULT_BACKLOG = 1024
_KILL_GRACE = 5.0          # seconds from SIGTERM to SIGKILL
_RELOAD_SETTLE = 1.0         # --reload: how long retired children may take to exit unmentioned
_CONTROL_SPARE = 2.0         # --reload, --stop, --upgrade: seconds waited beyond the daemon's limits
_DRAIN_REPORT_FIRST = 10.0   # a retired child still running: a line after this long,
_DRAIN_REPORT_EVERY = 60.0   # then this often
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 30.0
_STABLE_AFTER = 10.0       # a child ready this long resets the crash backoff
_QUICK_DEATH = 2.0         # a crash this soon after ready counts toward a crash loop
_CRASH_LOOP = 3            # that many in a row: the slot's replacements are backed off
_MAX_WORKERS = 256         # each costs the daemon a few descriptors and a process
_EXIT_GRACE = 1.0          # after a child hangs up, how long to wait for it to exit
_DEFAULT_QUIET = 0.3       # steering: the old generation's quiet period before its stop
_HELPER_TIMEOUT = 2.0      # --user with steering: the socket helper's answer, at most
_HELPER_NAME = b"sp-sock-helper"    # its process name (ps, top), 15 bytes at most
_DEFAULT_PROBATION = 2.0   # activation: how long the old generation stays ready to take over
_QUIET_LOOK = 0.05         # how often its backlog is looked at meanwhile
_READY_LOOK = 0.05         # activation: how often a starting server is looked at
_READY_UNSEEN = 1.0        # activation: READY=1 taken alone once not seen waiting for this long
# accept(2) and accept4(2), by machine: a thread blocked in one shows it in
# /proc/PID/task/TID/syscall.
_ACCEPT_SYSCALLS = {"x86_64": (43, 288), "aarch64": (202, 242), "arm64": (202, 242),
                    "riscv64": (202, 242), "i686": (), "armv7l": (285, 366)}
# select(2)/pselect6(2) (nfds, readfds, ...) and poll(2)/ppoll(2) (fds, nfds,
# ...), by machine: what a thread blocked in one waits for is in its memory
# (/proc/PID/mem, readable by an ancestor), at the address in its syscall file.
_SELECT_SYSCALLS = {"x86_64": (23, 270), "aarch64": (72,), "arm64": (72,), "riscv64": (72,),
                    "armv7l": (142, 335)}
_POLL_SYSCALLS = {"x86_64": (7, 271), "aarch64": (73,), "arm64": (73,), "riscv64": (73,),
                  "armv7l": (168, 336)}
_QUIET_MAX = 10.0          # a backlog not drained by then is not going to be
_SO_ATTACH_REUSEPORT_CBPF = 51
_BPF_RET_K = 0x06          # BPF_RET | BPF_K: "return the constant k"
_BPF_LD_W_ABS = 0x20       # BPF_LD | BPF_W | BPF_ABS: "A = the word at k" (or an extension)
_BPF_JSET_K = 0x45         # BPF_JMP | BPF_JSET | BPF_K: "if A & k: skip jt, else jf"
_SKF_AD_RANDOM = (-0x1000 + 56) & 0xFFFFFFFF    # SKF_AD_OFF + SKF_AD_RANDOM: a random word
# Activation: a generation ready by READY=1 alone (never seen waiting) gets
# one new connection in this many (a power of two) until it is seen accepting.
_SHARE = 16

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

_HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD,
                    signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU,
                    signal.SIGALRM)     # SIGALRM: our own timer, the counts are due
_ACTIVATION_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_DAEMON_ONLY_ENV = (ENV_FD, ENV_WORKER, "NOTIFY_SOCKET", *_ACTIVATION_ENV)
_PR_SET_CHILD_SUBREAPER = 36

_USAGE = ("socketprotector.py [options] PORT -- COMMAND [ARG...]\n"
          "       socketprotector.py --reload|--stop|--status|--upgrade --pid-file PATH")

_log = logging.getLogger("socketprotector")

# ---------------------------------------------------------------------------
# Exceptions
# ---------------------------------------------------------------------------


class SocketProtectorError(Exception):
    """A failure the user can cause or fix; str() is one line."""


class UsageError(SocketProtectorError):
    """The command line is wrong (exit code 2)."""


class ProtocolError(SocketProtectorError):
    """The peer on the channel broke the protocol."""


# ---------------------------------------------------------------------------
# The library the child imports
# ---------------------------------------------------------------------------


class ConnectionReceiver:
    """The source of a server's connections, for event loops.

    Under socketprotector it takes the channel named by $SOCKETPROTECTOR_FD
    (removing the variable, so the server's own subprocesses don't see it)
    and tells the daemon it is ready.  Without the daemon, given a port, it
    listens on that port itself, so the same server runs either way.

    Register fileno() for reading; when it is readable call receive().
    Once ``ended`` is true the daemon sends nothing more: finish the open
    connections, close the receiver and exit.  In either hand-off mode the
    same calls work: with ``--handoff listener`` the daemon hands over the
    listening socket and receive() accepts from it directly.
    """

    def __init__(self, port: Optional[int] = None, *, host: str = "",
                 backlog: int = _DEFAULT_BACKLOG, _batch: int = _MAX_BATCH) -> None:
        """Raise SocketProtectorError if neither the daemon's channel nor a
        port is available, or OSError if listening on the port fails."""
        self.ended = False
        self._held: collections.deque = collections.deque()   # received, not yet returned
        self._channel: Optional[socket.socket] = None
        # Ours, or handed over by the daemon, each with a poll: anything left
        # in its backlog?
        self._listeners: List[tuple] = []
        # Under the daemon: fileno(), an epoll over the channel and, in listener
        # mode, the listener; it lets a stalled receiver wait for what is new.
        self._poller = None
        self._family = socket.AF_INET                    # of the connections the daemon sends
        self._stream_over = False   # the daemon ended the stream (or is gone)
        self._drain_at_end = False  # the daemon is shutting down: accept the backlog first
        self._stalled = False       # sent b"N": receive nothing until the daemon's b"K"
        self._accept_paused_until = 0.0     # out of descriptors: accept again after this
        fd_text = os.environ.pop(ENV_FD, None)
        handoff = os.environ.pop(ENV_HANDOFF, "forward")
        self._daemon = fd_text is not None
        self._listener_mode = self._daemon and handoff == "listener"
        if self._daemon:
            self._channel = _adopt_channel(fd_text)
            self._pending = select.poll()   # cheaper than a recvmsg() that finds nothing
            self._pending.register(self._channel, select.POLLIN)
            # One stable descriptor for the caller's event loop, covering the
            # listener the daemon may hand over later.
            self._poller = select.epoll()
            self._poller.register(self._channel.fileno(), select.EPOLLIN)
            self._send(_MSG_READY + max(1, min(_batch, _MAX_BATCH)).to_bytes(2, "big"))
        elif port is not None:
            self._add_listener(_listen(host or None, port, backlog))
        else:
            raise SocketProtectorError(
                f"receive_connections: ${ENV_FD} is not set (not started by "
                f"socketprotector) and no port was given to listen on")

    def fileno(self) -> int:
        """The descriptor to wait on for readability (-1 once closed)."""
        if self._poller is not None:
            return self._poller.fileno()
        sock = self._channel if self._daemon else (
            self._listeners[0][0] if self._listeners else None)
        return sock.fileno() if sock is not None else -1

    def receive(self, limit: Optional[int] = None) -> List[socket.socket]:
        """Return up to ``limit`` (default: all) connections available now.

        Never blocks; returns [] when there are none.  A connection the
        daemon sent is this process's once received: until then it waits in
        the daemon's queue, and if this process dies it goes to the next
        child.  With a ``limit``, the rest of a received message is kept for
        the next call (which does not wait for fileno()).  Sets ``ended``
        once the daemon has ended the stream; keep calling until it returns [].
        """
        # Forwarding, fileno() watches the channel alone: called when it is
        # readable, the first message is taken without asking first (a poll).
        return self._receive(limit, look=self._listener_mode or not self._daemon)

    def _receive(self, limit: Optional[int], look: bool) -> List[socket.socket]:
        """receive(); with look false, the first message is taken without
        asking whether one waits (the caller was just told one does)."""
        room = limit if limit is not None else sys.maxsize
        conns: List[socket.socket] = []
        held = self._held
        # The channel first: a retired child stops accepting at once.
        while self._daemon and len(conns) < room:
            if held:
                conns.append(held.popleft())
                continue
            if self._stream_over or (look and not self._pending.poll(0)):
                break
            look = True
            if not self._receive_message():
                break
        if self._listeners and len(conns) < room:
            if self._stream_over:
                self._drain()       # at shutdown: the backlog, into _held
                while self._held and len(conns) < room:
                    conns.append(self._held.popleft())
            else:
                conns += self._accept(min(room - len(conns), _MAX_BATCH))
        return conns

    def _add_listener(self, listener: socket.socket) -> None:
        listener.setblocking(False)
        waiting = select.poll()
        waiting.register(listener, select.POLLIN)
        self._listeners.append((listener, waiting.poll))
        if self._poller is not None:
            self._poller.register(listener.fileno(), select.EPOLLIN)

    def _accept(self, limit: int) -> List[socket.socket]:
        """What the listener's backlog holds now, up to limit; [] while paused."""
        conns: List[socket.socket] = []
        if self._accept_paused_until:
            if time.monotonic() < self._accept_paused_until:
                if self._poller is not None:
                    self._poller.poll(0)    # consume the edge that woke the caller
                return conns
        error = None
        if len(self._listeners) > 1:      # start with each in turn, so none starves
            self._listeners.append(self._listeners.pop(0))
        for listener, more in list(self._listeners):
            try:
                error = _accept_into(listener.accept, more, limit - len(conns), conns) or error
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # No longer listening: the daemon took a hung generation's
                # socket out of its group (shutdown()); what it held moved on.
                self._drop_listener(listener)
                continue
            if len(conns) >= limit:
                break
        if error is not None:
            self._pause_accepting(error)
        elif self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._listen_edge(False)
        return conns

    def _drop_listener(self, listener: socket.socket) -> None:
        self._listeners = [entry for entry in self._listeners if entry[0] is not listener]
        if self._poller is not None:
            self._poller.unregister(listener.fileno())
        listener.close()

    def _pause_accepting(self, error: OSError) -> None:
        """Out of descriptors: the backlog keeps what waits, and accepting
        pauses.  An event loop is woken again by the next new connection
        only (edge-triggered), not by the backlog that stays readable."""
        if not self._accept_paused_until:
            _log.warning("socketprotector: cannot accept: %s; pausing %g s",
                         error.strerror, _ACCEPT_PAUSE)
            self._listen_edge(True)
        self._accept_paused_until = time.monotonic() + _ACCEPT_PAUSE
        if self._poller is not None:
            self._poller.poll(0)

    def _listen_edge(self, edge: bool) -> None:
        """While paused, the listeners wake the caller only for new connections."""
        if self._poller is not None:
            for listener, _ in self._listeners:
                self._poller.modify(listener.fileno(),
                                    select.EPOLLIN | (select.EPOLLET if edge else 0))

    def _wait_ms(self) -> int:
        """For a blocking wait on fileno(): milliseconds until accepting resumes, or -1."""
        if not self._accept_paused_until:
            return -1
        return max(1, int((self._accept_paused_until - time.monotonic()) * 1000) + 1)

    def _drain(self) -> None:
        """The stream is over at shutdown: accept the whole backlog before
        letting go of the listener (nobody else will).  Short of descriptors,
        the rest waits for the next call."""
        batch = self._accept(sys.maxsize)
        self._held.extend(batch)
        if not self._accept_paused_until:
            self._release_listener()

    def _release_listener(self) -> None:
        if self._listeners:
            for listener, _ in self._listeners:
                if self._poller is not None:
                    self._poller.unregister(listener.fileno())
                listener.close()
            self._listeners = []
            if self._poller is not None and self._channel is not None and self._drain_at_end:
                # Readable at its end: the caller's loop wakes and sees ``ended``.
                self._poller.register(self._channel.fileno(), select.EPOLLIN)
        self.ended = True

    def _receive_message(self) -> bool:
        """Take one message from the daemon; False if there was none to take."""
        if self._stalled:
            return self._await_resume()
        try:
            msg, fds, truncated = _peek_message(self._channel)
        except BlockingIOError:
            return False
        if not msg and not fds:
            self._end()
            return bool(self._held)     # listener mode: the backlog it accepted at the end
        kind = msg[:1]
        if truncated:
            # Too few free descriptors (RLIMIT_NOFILE): the message stays
            # queued; the daemon takes it back and sends it again in smaller
            # pieces.  Until it says so, receiving could race with it.
            _close_fds(fds)
            if kind != _MSG_CONNS:
                raise ProtocolError(f"unexpected truncated message from socketprotector: {msg!r}")
            self._stall(True)
            self._send(_MSG_NACK)
            return False
        _consume_message(self._channel)     # what was peeked is ours now
        if kind == _MSG_CONNS and fds:
            if len(msg) > 1:
                self._family = msg[1]
            # Family and type given, so socket() needs no getsockopt() calls;
            # accepted descriptors are blocking already.
            family = self._family
            if family:
                self._held.extend(socket.socket(family, socket.SOCK_STREAM, 0, fd)
                                  for fd in fds)
            else:       # listeners of several families: each socket says its own
                self._held.extend(socket.socket(fileno=fd) for fd in fds)
            return True
        if msg == _MSG_DRAIN and not fds:
            self._drain_at_end = True
            return True
        if msg == _MSG_LISTENER and fds and self._listener_mode:
            for fd in fds:
                self._add_listener(socket.socket(fileno=fd))
            return True
        _close_fds(fds)
        raise ProtocolError(f"unexpected message from socketprotector: {msg!r} "
                            f"with {len(fds)} descriptors")

    def _stall(self, stalled: bool) -> None:
        """While stalled the message that did not fit stays at the head of the
        queue, readable: the channel then wakes the caller only when a new
        message arrives (edge-triggered), never for the one that waits, so
        waiting for the daemon's b"K" costs nothing."""
        self._stalled = stalled
        if self._poller is not None and self._channel is not None:
            self._poller.modify(self._channel.fileno(),
                                select.EPOLLIN | (select.EPOLLET if stalled else 0))
            self._poller.poll(0)    # take the edge the change itself raised

    def _await_resume(self) -> bool:
        """Stalled: look (without taking) for the daemon's b"K" at the head of the queue."""
        self._poller.poll(0)        # the edge that woke the caller: taken before looking
        try:
            head = self._channel.recv(16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        if head == _MSG_RESUME:
            _consume_message(self._channel)
            self._stall(False)
            return True
        # The daemon has closed its end (it is gone): no b"K" will ever come.
        if not head or any(events & select.POLLHUP for _, events in self._pending.poll(0)):
            self._stall(False)      # readable at its end: the caller sees ``ended``
            self._end()
        return False

    def close(self) -> None:
        """Stop receiving: what the daemon sent and this process did not
        receive goes to another child."""
        while self._held:
            self._held.popleft().close()
        if self._channel is not None:
            try:
                # The daemon holds this end too: say so, or it would not know.
                self._channel.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        for resource in (*(listener for listener, _ in self._listeners), self._channel,
                         self._poller):
            if resource is not None:
                resource.close()
        self._listeners = []
        self._channel = self._poller = None

    def __enter__(self) -> "ConnectionReceiver":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _send(self, msg: bytes) -> None:
        if self._stream_over or self._channel is None:
            return
        try:
            self._channel.sendmsg([msg], [], socket.MSG_NOSIGNAL)
        except (BrokenPipeError, ConnectionResetError):
            self._end()

    def _end(self) -> None:
        """The stream ended: let go of a handed-over listener, first accepting
        its backlog if the daemon is shutting down (else a successor has it).

        The channel stays open until close(): at its end it stays readable,
        so an event loop waiting on fileno() wakes up and sees ``ended``.
        """
        self._stream_over = True
        if not self._listeners or self._poller is None:
            self.ended = True
        elif self._drain_at_end:
            # While the backlog drains, only the listener may wake the
            # caller: the channel, at its end, would stay readable.
            self._poller.unregister(self._channel.fileno())
            self._drain()
        else:
            self._release_listener()


def receive_connections(port: Optional[int] = None, *, host: str = "") -> Iterator[socket.socket]:
    """Yield connected, blocking sockets until the daemon ends the stream.

    Under socketprotector, the first request tells the daemon this child is
    ready.  Without it, listens on ``port`` (all interfaces, or ``host``) and
    never ends.  Raises SocketProtectorError when neither is available.
    """
    # One connection per message: what this process has not handed to the
    # application stays in the daemon's queue, safe if this process dies.
    with ConnectionReceiver(port, host=host, _batch=1) as receiver:
        poller = select.poll()
        poller.register(receiver.fileno(), select.POLLIN)
        look = True
        while True:
            conns = receiver._receive(1, look)
            look = True
            if conns:
                yield conns[0]
            elif receiver.ended:
                return
            else:
                poller.poll(receiver._wait_ms())
                # Forwarding: the channel is what woke us; take its message.
                look = receiver._listener_mode or not receiver._daemon


async def serve_connections(handler, port: Optional[int] = None, *, host: str = "",
                            **stream_options) -> None:
    """asyncio: ``await handler(reader, writer)`` for each connection, each in
    a task of its own, until the daemon ends the stream; then wait for the
    handlers to finish, and return.

    The connections come as asyncio streams (``stream_options`` go to
    asyncio.open_connection, for example ``limit``).  Without the daemon it
    listens on ``port`` (all interfaces, or ``host``) and never returns.
    Raises SocketProtectorError when neither is available.
    """
    import asyncio      # here: the other users of this module need not load it
    loop = asyncio.get_running_loop()
    receiver = ConnectionReceiver(port, host=host)
    tasks: set = set()
    ended = loop.create_future()
    fd = receiver.fileno()

    async def run(conn: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=conn, **stream_options)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    def take() -> None:
        for conn in receiver.receive():
            conn.setblocking(False)
            task = loop.create_task(run(conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if receiver.ended:
            loop.remove_reader(fd)
            if not ended.done():
                ended.set_result(None)
        elif receiver._accept_paused_until:
            # Waiting for descriptors: fileno() may stay readable meanwhile,
            # so look again after the pause, not at once.
            loop.remove_reader(fd)
            loop.call_later(receiver._wait_ms() / 1000, watch)

    def watch() -> None:
        if not ended.done():
            loop.add_reader(fd, take)
            take()

    loop.add_reader(fd, take)
    try:
        await ended
    finally:
        loop.remove_reader(fd)
        receiver.close()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------------------
# Descriptor and channel helpers (both sides)
# ---------------------------------------------------------------------------


def _adopt_channel(fd_text: str) -> socket.socket:
    """The inherited channel socket, made close-on-exec."""
    try:
        fd = int(fd_text)
        sock = socket.socket(fileno=fd)
    except (ValueError, OSError) as e:
        raise SocketProtectorError(
            f"${ENV_FD}={fd_text!r} does not name an open socket: {e}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        sock.detach()
        raise SocketProtectorError(f"${ENV_FD}={fd_text!r} is not a socketprotector channel")
    os.set_inheritable(fd, False)
    sock.setblocking(True)
    return sock


def _send_fds(sock: socket.socket, msg: bytes, fds: List[int]) -> None:
    # socket.send_fds() ignores its flags argument, so call sendmsg directly.
    sock.sendmsg([msg], [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))], _SEND_FLAGS)


# Plain ints: on 3.11+ `|` on socket.MSG_* flags is an IntFlag call, slow in a hot path.
_SEND_FLAGS = int(socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
_close = os.close
_monotonic = time.monotonic
_LOOK_EVERY = 4            # fast path: look for a batch after every 4th lone accept
_PUBLISH_EVERY = 1.0       # seconds: how stale the counts beside the pid file may be
_fd_array = functools.partial(array.array, "i")
_PEEK_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC | socket.MSG_PEEK)
_DONTWAIT = int(socket.MSG_DONTWAIT)
_TRUNCATED = int(socket.MSG_CTRUNC | socket.MSG_TRUNC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_CMSG_ROOM = socket.CMSG_SPACE(_MAX_BATCH * array.array("i").itemsize)


def _peek_message(sock: socket.socket):
    """The next message as (data, fds, truncated), left in the queue; raises
    BlockingIOError if there is none.  The fds are copies, now ours.

    When the descriptors do not all fit (RLIMIT_NOFILE) the kernel sets
    MSG_CTRUNC and closes the copies that did not fit; the message itself,
    peeked and not taken, loses nothing.
    """
    # socket.recv_fds() ignores its flags (python/cpython#128881), so call
    # recvmsg directly: MSG_CMSG_CLOEXEC makes every received fd close-on-exec.
    try:
        msg, ancdata, flags, _ = sock.recvmsg(16, _CMSG_ROOM, _PEEK_FLAGS)
    except ConnectionResetError:
        return b"", [], False
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return msg, list(fds), bool(flags & _TRUNCATED)


def _unread_bytes(sock: socket.socket) -> int:
    """Bytes queued to be read (FIONREAD): for SEQPACKET, the sum over all messages."""
    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)), sys.byteorder)


def _backlog_length(listener: socket.socket) -> Optional[int]:
    """Connections waiting to be accepted by a TCP listener (tcp_info's
    tcpi_unacked, which Linux reports for listeners), or None if unknown."""
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    except (OSError, AttributeError):
        return None
    return int.from_bytes(info[24:28], sys.byteorder) if len(info) >= 28 else None


def _proc_stat(path: str) -> List[bytes]:
    """The fields of a /proc/.../stat file after the command name, which may
    hold spaces and parentheses: [state, ppid, ...].  OSError if it is gone."""
    with open(path, "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2:].split()


def _processes_holding(inodes, ours=()) -> List[int]:
    """Our descendants with one of the sockets ``inodes`` open, leaving out
    the processes in ``ours`` and everything below them.

    The daemon is their subreaper (or PID 1), so what a child forked stays
    below us even once the child is gone.  ``ours`` are the live children
    the daemon started: what they run is theirs, and between fork and exec
    they hold a copy of every descriptor the daemon has, which the exec
    closes.  Only run when a child has exited (or hung): it reads every
    process's stat.
    """
    below = _children_map()
    targets = {f"socket:[{inode}]" for inode in inodes}
    holders, todo = [], list(below[os.getpid()])
    while todo:
        pid = todo.pop()
        if pid in ours:
            continue
        todo += below[pid]
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    holders.append(pid)
                    break
            except OSError:
                pass
    return sorted(holders)


def _spill_pair() -> List[socket.socket]:
    """A SEQPACKET socketpair, both ends non-blocking: [writer, reader]."""
    pair = list(socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET))
    for sock in pair:
        sock.setblocking(False)
    return pair


def _children_map() -> dict:
    """Every process's children, read from /proc: {ppid: [pid, ...]}."""
    below: dict = collections.defaultdict(list)
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                below[int(_proc_stat(f"/proc/{name}/stat")[1])].append(int(name))
            except (OSError, ValueError, IndexError):
                pass    # gone meanwhile
    return below


def _consume_message(sock: socket.socket) -> None:
    """Drop the message just peeked: with no room for them, the kernel closes
    its own references to the descriptors, and the peeked copies remain."""
    sock.recv(16, _DONTWAIT)


def _accept_into(accept, more, limit: int, out: list) -> Optional[OSError]:
    """Accept up to limit of the connections waiting now, without blocking,
    appending accept()[0] for each to out.  Return the error that calls for a
    pause (out of descriptors or memory: the connection stays in the
    backlog), else None.  One policy for the daemon and the child.

    ``more`` is a poll(0) on the listener: a failed accept() costs more than
    a poll() (5 us against 0.3 measured here), so it asks before each accept
    after the first.  Accepted sockets are blocking: accept() gives a
    blocking descriptor.
    """
    taken = errors = 0
    while taken < limit:
        if (taken or errors) and not more(0):
            break
        try:
            out.append(accept()[0])
        except BlockingIOError:
            break
        except OSError as e:
            if e.errno in _ACCEPT_SHORT:
                return e
            if e.errno not in _ACCEPT_SKIP:
                raise
            errors += 1     # that connection failed; the next may not
            if errors >= _MAX_ACCEPT_ERRORS:
                return e    # a listener that only fails: do not spin on it
            continue
        taken += 1
    return None


def _listen(host: Optional[str], port: int, backlog: int,
            reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket: on every interface (IPv6 and IPv4) when host is None.
    reuse_port: with SO_REUSEPORT, once a probe (a plain bind) has found
    nothing listening there: another daemon must not silently share it."""
    where = f"{host or '*'}:{port}"

    def create(address, family, **options):
        if reuse_port and port:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if options.get("dualstack_ipv6"):
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                probe.bind(address)
        return socket.create_server(address, family=family, backlog=backlog,
                                    reuse_port=reuse_port, **options)
    try:
        if host is None:
            if socket.has_dualstack_ipv6():
                try:
                    return create(("", port), socket.AF_INET6, dualstack_ipv6=True)
                except OSError as e:
                    if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                        raise
            return create(("", port), socket.AF_INET)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        return create(address, family)
    except socket.gaierror as e:
        raise SocketProtectorError(f"cannot resolve bind address {host!r}: {e.strerror}") from None
    except OSError as e:
        # create_server() rewrites strerror with the address; keep the plain reason
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise SocketProtectorError(f"cannot listen on {where}: {reason}") from None


def _format_address(sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        name = sock.getsockname()
        return f"unix:{os.fsdecode(name) if name else '(unnamed)'}"
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _version_key(version: str) -> tuple:
    """A version's numbers, to compare: 1.10.0 comes after 1.9.2."""
    return tuple(int(n) for n in re.findall(r"\d+", version))


def _describe_status(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


# ---------------------------------------------------------------------------
# The daemon: children and generations of workers
# ---------------------------------------------------------------------------


class _State(enum.Enum):
    STARTING = "starting"    # forked; not yet asked for a connection
    READY = "ready"          # asked; waits for the rest of its generation
    SERVING = "serving"      # its generation serves: it is sent new connections
    QUIETING = "quieting"    # steered away; accepting its backlog, then retired
    RETIRING = "retiring"    # stream ended; finishing its connections
    STOPPING = "stopping"    # sent SIGTERM; SIGKILL at kill_at
    EXITED = "exited"


# A death the program brought on itself.  Any other signal (SIGKILL from the
# OOM killer or an operator, SIGTERM, ...) came from outside, and a worker
# that was serving is then replaced at once, however often it happens.
_CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE,
                            signal.SIGILL, signal.SIGSYS, signal.SIGTRAP})


class _Child:
    """One child process: its worker slot and generation, and the daemon's
    end of its channel.  The connection queue keeps its forwarding fields."""

    def __init__(self, pid: int, index: int, generation: "_Generation",
                 channel: socket.socket, inbox: Optional[socket.socket]) -> None:
        self.pid = pid
        self.index = index                       # its worker slot, 0..N-1
        self.generation = generation
        self.channel: Optional[socket.socket] = channel
        # Forwarding: the child's end of the pair, kept so that what the
        # child has not received stays ours when it dies.
        self.inbox: Optional[socket.socket] = inbox
        self.on_channel: Callable[[int], None] = lambda mask: None   # its selector callback
        self.state = _State.STARTING
        self.started = time.monotonic()
        self.ready_at = 0.0
        self.retired_at = 0.0                    # when it was told to take no more
        self.report_at: Optional[float] = None   # retired: the next "still draining" line
        self.deadline: Optional[float] = None    # ready, hang or drain timeout, by state
        self.kill_at: Optional[float] = None     # SIGKILL after SIGTERM
        self.paused_until = 0.0                  # after a NACK or a transient send error
        self.batch_limit = 1                     # as the child asks; halved by each NACK
        self.blocked = False                     # channel full: waiting for EVENT_WRITE
        self.stalled = False                     # sent b"N", not yet sent b"K": send nothing
        self.nacked = False                      # ever short of descriptors
        # Sizes of the messages sent that the child may not have received
        # yet, oldest first, and their sum (the inbox is the truth: unreceived()).
        self.queued: collections.deque = collections.deque()
        self.unread = 0
        self.sent = 0                            # connections sent to it, in all
        self.waiting_since = 0.0                 # --hang-timeout: last progress seen
        self.reclaimed = 0                       # connections taken back from its queue
        # Processes (forked by the child) that still hold its channel after
        # it exited: its queue is theirs to receive until they are gone.
        self.holders: dict = {}                  # pid -> pidfd (-1: none, checked by timer)
        self.exec_report: Optional[int] = None   # pipe: "errno:strerror" if exec failed
        self.exec_error = b""
        # --handoff activation: its NOTIFY_SOCKET, and --ready-delay's deadline.
        self.notify: Optional[socket.socket] = None
        self.assume_ready_at: Optional[float] = None
        self.notified = False       # activation: sent READY=1, not yet seen waiting
        self.look_at: Optional[float] = None     # activation: next look for it waiting
        # For the status: how it was judged ready ("channel": it sent b"R";
        # "notify": READY=1; "epoll", "accept", "select", "poll": seen waiting; "delay":
        # --ready-delay), and the directory it started in, resolved.
        self.ready_by: Optional[str] = None
        self.cwd: Optional[str] = None

    def can_take(self, now: float) -> bool:
        return (self.channel is not None and not self.blocked and not self.stalled
                and now >= self.paused_until)

    def signal(self, sig: int, group: bool) -> None:
        """To the process group it leads (falling back to itself), or to itself
        alone; whom is the supervisor's decision (_Supervisor._signal)."""
        try:
            if group:
                os.killpg(self.pid, sig)
                return
        except OSError:
            pass
        try:
            os.kill(self.pid, sig)
        except OSError:
            pass


class _Generation:
    """The workers one start or restart began, one child per slot.

    It serves once every slot holds a ready child; until then the previous
    generation serves, and if any of its children dies first, the whole
    generation is stopped.  A serving generation refills a slot whose
    child died: at once if that child had served, after a back-off if it
    never got ready or keeps crashing soon after it does.
    """

    def __init__(self, number: int, size: int) -> None:
        self.number = number
        self.slots: List[Optional[_Child]] = [None] * size
        self.serving = False
        self.respawn_at: dict = {}               # slot -> when to start its next child
        self.backoff: dict = {}                  # slot -> the next back-off, seconds
        self.quick_deaths: dict = {}             # slot -> crashes soon after ready, in a row
        # Activation with steering: the listening sockets of its own (None:
        # the daemon's, shared), and once steered away, when to look at their
        # backlog next, when it retires if nothing more waits, and at the latest.
        self.sockets: Optional[List[socket.socket]] = None
        self.look_at: Optional[float] = None
        self.quiet_at: Optional[float] = None
        self.quiet_limit: Optional[float] = None
        self.probation_until: Optional[float] = None     # serving, its predecessor kept
        self.hung = False       # left its connections unaccepted: ended once replaced
        # Its backlog at the last look, and since when none of it was seen
        # accepted: while it serves with a share of new connections
        # (unproven: ready by READY=1 alone, it gets one in _SHARE, its
        # predecessor the rest, until seen accepting; look_at is then when
        # to look next), or, --hang-timeout in listener and activation
        # modes, once replaced.
        self.unproven = False
        self.backlog_seen = 0
        self.stalled_since: Optional[float] = None

    def children(self) -> List[_Child]:
        return [c for c in self.slots if c is not None]

    def complete(self) -> bool:
        return all(c is not None and c.state is _State.READY for c in self.slots)

    def ready(self) -> List[_Child]:
        return [c for c in self.slots if c is not None and c.state is _State.SERVING]

    def vacate(self, child: _Child) -> bool:
        """The child no longer fills its slot (a replacement may); whether it did."""
        if child.index < len(self.slots) and self.slots[child.index] is child:
            self.slots[child.index] = None
            return True
        return False

    def forget(self, index: int) -> None:
        """A slot removed (SIGTTOU): its respawn and crash history go with it."""
        for table in (self.respawn_at, self.backoff, self.quick_deaths):
            table.pop(index, None)


class _SpawnError(SocketProtectorError):
    """The command could not be started."""


_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR


class _Poller:
    """The loop's epoll, with one callback per descriptor.

    (selectors builds a key object per event: a few microseconds per
    wake-up, which forwarding pays once per connection.)  Callbacks get the
    epoll event mask: _IN (or EPOLLHUP, EPOLLERR: reading finds out) and _OUT.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self.handlers: dict = {}
        self.poll = self._epoll.poll

    def register(self, fileobj, events: int, callback) -> None:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        self._epoll.register(fd, events)
        self.handlers[fd] = callback

    def modify(self, fileobj, events: int) -> None:
        self._epoll.modify(fileobj if isinstance(fileobj, int) else fileobj.fileno(), events)

    def unregister(self, fileobj) -> None:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        self._epoll.unregister(fd)
        del self.handlers[fd]

    def close(self) -> None:
        self._epoll.close()


# ---------------------------------------------------------------------------
# The daemon: the connection queue (forwarding)
# ---------------------------------------------------------------------------


class _Listener:
    """One of the daemon's listening sockets, with what accepting from it needs."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.accept = sock._accept          # raw fds: no socket object per connection
        waiting = select.poll()             # is anything left in the backlog?
        waiting.register(sock, select.POLLIN)
        self.more = waiting.poll
        self.quota = 0                      # at shutdown: how many are left to accept
        self.unlooked = 0                   # fast path: accepts left before looking again
        self.address = _format_address(sock)    # for the status, once
        self.inode = _inode(sock)                 # the status reader looks up its backlog

    def accept_more(self, fds, limit: int) -> None:
        """Fast path, after one accept into fds: what else waits, up to limit
        in all, for the same message.  It looks (a poll() each time) while
        the last look found some, else only every _LOOK_EVERY-th time: at
        low concurrency there is never more, and the look cost 3 us per
        connection here; at high concurrency batches resume within a few
        connections (epoll wakes at once for what is left).  Accept errors
        other than EAGAIN are raised, as accept() raises them."""
        if limit <= 1:
            return
        if self.unlooked:
            self.unlooked -= 1
            return
        more, accept = self.more, self.accept
        try:
            while len(fds) < limit and more(0):
                fds.append(accept()[0])
        except BlockingIOError:
            pass
        self.unlooked = 0 if len(fds) > 1 else _LOOK_EVERY - 1


class _ConnectionQueue:
    """Accepts connections and hands them to the children that may take them.

    It owns the listening sockets, the daemon's own queue of accepted
    connections, and, as the ledger of what each child has not received,
    each child's channel queue: a child that exits, hangs up or stalls gives
    what it had not received back to this queue.  It knows which children
    may take connections (``takers``, set by the supervisor), not why.
    Each connection goes to the taker with the fewest connections sent and
    not yet received (ties in turn), so a busy or stuck worker is passed over.
    """

    def __init__(self, sel: _Poller, listeners: List[socket.socket], *,
                 forwarding: bool, backlog: int, hang_timeout: Optional[float],
                 hung_up: Callable[[_Child], None],
                 own_pids: Callable[[], Any] = tuple) -> None:
        self._sel = sel
        self.listeners = [_Listener(sock) for sock in listeners]
        self.by_fd = {listener.fd: listener for listener in self.listeners}
        self._forwarding = forwarding
        self._backlog = backlog
        self._hang_timeout = hang_timeout
        self._hung_up = hung_up                  # the supervisor's: a child's channel broke
        self.own_pids = own_pids                 # the processes the daemon started itself
        families = {sock.family for sock in listeners}
        # One family: the message names it, and the child need not ask
        # each socket; several: 0, and it does.
        self._message = _MSG_CONNS + bytes([families.pop() if len(families) == 1 else 0])
        self.waiting: collections.deque = collections.deque()   # accepted fds not yet sent
        # Connections parked while we are short of descriptors: in flight in
        # a socketpair of our own they take no descriptor of ours.  The sizes
        # of the messages there, oldest first; [writer, reader] (forwarding).
        self.spilled: collections.deque = collections.deque()
        self.spill: Optional[List[socket.socket]] = _spill_pair() if forwarding else None
        self.takers: List[_Child] = []
        self._turn = 0                           # where the next tie-break starts
        self.listening = False
        self.accept_paused_until: Optional[float] = None
        self._accept_error: Optional[str] = None      # logged once until accept works again
        self.stopping = False
        self.take_back: List[_Child] = []        # queues not yet all taken back (short of fds)
        self.deferred: List[_Child] = []         # exited; others still hold their channel
        self.holders_check_at: Optional[float] = None   # no pidfd: look for holders again
        self.forwarded = 0
        self._debug = _log.isEnabledFor(logging.DEBUG)

    def addresses(self) -> List[str]:
        return [listener.address for listener in self.listeners]

    def sockets(self) -> List[socket.socket]:
        return [listener.sock for listener in self.listeners]

    def set_takers(self, takers: List[_Child]) -> None:
        self.takers = takers

    def deadlines(self, now: float) -> List[float]:
        pending = [d for d in (self.accept_paused_until, self.holders_check_at) if d is not None]
        if self.waiting and self.takers:
            paused = [c.paused_until for c in self.takers if c.paused_until > now]
            if len(paused) == len(self.takers):
                pending.append(min(paused))     # a past pause is no deadline: no spin
        return pending

    def check_deadlines(self, now: float) -> None:
        if self.accept_paused_until is not None and now >= self.accept_paused_until:
            self.accept_paused_until = None
            for child in list(self.take_back):  # short of descriptors the last time
                if self.reclaim(child) and child.stalled:
                    self.resume(child)
        if self.holders_check_at is not None and now >= self.holders_check_at:
            self.holders_check_at = None
            for child in list(self.deferred):
                self.check_holders(child)

    # -- accepting ----------------------------------------------------------

    def on_listener(self, listener: _Listener, mask: int) -> None:
        if not self.listening:
            return      # unregistered by an earlier event of the same poll
        room = _MAX_WAITING - len(self.waiting) - self.parked()
        if self.stopping:
            listener.quota -= self.accept(listener, min(listener.quota, room))
        else:
            self.accept(listener, room)

    def accept(self, listener: _Listener, limit: int) -> int:
        """Accept up to limit connections into our queue; how many."""
        before = len(self.waiting)
        error = _accept_into(listener.accept, listener.more, limit, self.waiting)
        count = len(self.waiting) - before
        if error is not None:
            # The connection stays in the backlog; try again shortly
            # instead of spinning on a listener that stays readable.
            if self._accept_error != error.strerror:
                self._accept_error = error.strerror
                _log.warning("cannot accept: %s; retrying every %g s",
                             error.strerror, _ACCEPT_PAUSE)
            self.accept_paused_until = time.monotonic() + _ACCEPT_PAUSE
        elif count and self._accept_error:
            _log.info("accepting again")
            self._accept_error = None
        return count

    def stop(self) -> None:
        """Shutting down: accept each backlog as it is now (forwarding, with a
        taker), in steps as the children take it; then close the ports."""
        self.stopping = True
        if not (self._forwarding and self.takers):
            self.close_listeners()
            return
        for listener in self.listeners:
            waiting = _backlog_length(listener.sock)
            listener.quota = self._backlog if waiting is None else waiting

    def update_listening(self) -> None:
        """Accept while some taker can take and our queue has room; at
        shutdown, close each port once its old backlog is all accepted."""
        if self.stopping:
            for listener in [each for each in self.listeners
                             if not self.takers or each.quota <= 0 or not each.more(0)]:
                self._close(listener)
        now = time.monotonic()
        for child in self.takers:
            if child.paused_until and now >= child.paused_until:
                child.paused_until = 0.0    # over: forward_at_once() may send again
        self._set_listening(
            self._forwarding and len(self.waiting) + self.parked() < _MAX_WAITING
            and self.accept_paused_until is None
            and any(c.can_take(now) for c in self.takers))

    def _set_listening(self, want: bool) -> None:
        if want == self.listening:
            return
        for listener in self.listeners:
            if want:
                self._sel.register(listener.fd, _IN,
                                   functools.partial(self.on_listener, listener))
            else:
                self._sel.unregister(listener.fd)
        self.listening = want

    def _close(self, listener: _Listener) -> None:
        if self.listening:
            self._sel.unregister(listener.fd)
        self.listeners.remove(listener)
        del self.by_fd[listener.fd]
        listener.sock.close()

    def close_listeners(self) -> None:
        for listener in list(self.listeners):
            self._close(listener)
        self.listening = False

    # -- sending ------------------------------------------------------------

    def forward_at_once(self, listener: _Listener) -> bool:
        """The common case in one step: the listener is readable, our queue is
        empty, and a child takes connections and can now (the one, or the
        least loaded of several), with no --hang-timeout to watch.  Accept
        what waits and send it at once.
        False, with nothing lost, where that does not hold: then the general
        path runs (and meets any accept error itself)."""
        if (self.waiting or self.spilled or not self.takers or self._hang_timeout is not None
                or self.stopping or not self.listening or self._accept_error):
            return False
        if len(self.takers) > 1:
            return self._forward_to_least_loaded(listener)
        child = self.takers[0]
        if child.blocked or child.stalled or child.paused_until:
            return False
        accept = listener.accept
        try:
            fds = [accept()[0]]
        except BlockingIOError:
            return True         # someone else's wake-up: nothing to do
        except OSError:
            return False
        try:
            listener.accept_more(fds, child.batch_limit)    # it takes batches: one message
        except OSError:
            self.waiting.extend(fds)
            return False
        try:
            child.channel.sendmsg([self._message], [(_SOL_SOCKET, _SCM_RIGHTS, _fd_array(fds))],
                                  _SEND_FLAGS)
        except OSError:
            self.waiting.extend(fds)    # blocked, paused or gone: the general path decides
            return False
        for fd in fds:
            _close(fd)          # the child's queue holds them now
        count = len(fds)
        child.queued.append(count)      # the ledger, as _send() keeps it
        child.unread += count
        child.sent += count
        self.forwarded += count
        return True

    def _forward_to_least_loaded(self, listener: _Listener) -> bool:
        """forward_at_once() with several takers: what waits, in one message,
        to the least loaded; False if it could not go (it waits in our queue
        for the general path, which meets any error itself)."""
        now = time.monotonic()
        child = self._least_loaded(now)
        if child is None:
            return False
        waiting, accept = self.waiting, listener.accept
        try:
            waiting.append(accept()[0])
            listener.accept_more(waiting, child.batch_limit)
        except BlockingIOError:
            return True         # someone else's wake-up: nothing to do
        except OSError:
            return False        # what was accepted waits for the general path
        return self._send(child, now) and not waiting

    def pump(self) -> None:
        """Send waiting connections to the takers, the least loaded first."""
        if self.spilled and self.accept_paused_until is None:
            self._unpark()
        if not self.waiting or not self.takers:
            return
        now = time.monotonic()
        if len(self.takers) == 1:
            child = self.takers[0]
            while self.waiting and child.can_take(now) and self._send(child, now):
                pass
            return
        while self.waiting:
            child = self._least_loaded(now)
            if child is None:
                return
            self._send(child, now)

    def _least_loaded(self, now: float) -> Optional[_Child]:
        """The taker that can take with the fewest connections not yet received;
        ties go in turn."""
        best, fewest = None, 0
        count = len(self.takers)
        for k in range(count):
            child = self.takers[(self._turn + k) % count]
            if not child.can_take(now):
                continue
            unread = self.unreceived(child)
            if best is None or unread < fewest:
                best, fewest = child, unread
                if not unread:
                    break
        if best is not None:
            self._turn = (self.takers.index(best) + 1) % count
        return best

    def _send(self, child: _Child, now: float) -> bool:
        """One message to the child; False if it cannot take more now."""
        waiting = self.waiting
        room = min(len(waiting), child.batch_limit)
        batch = [waiting.popleft() for _ in range(room)]
        try:
            _send_fds(child.channel, self._message, batch)
        except (BlockingIOError, InterruptedError):
            waiting.extendleft(reversed(batch))
            child.blocked = True
            self._sel.modify(child.channel, _IN | _OUT)
            return False
        except OSError as e:
            waiting.extendleft(reversed(batch))
            if e.errno in (errno.ETOOMANYREFS, errno.ENOBUFS, errno.ENOMEM):
                # Too many descriptors in flight, or memory short for the
                # moment: the child is fine, try again shortly.  (Taking it
                # for a hang-up would make us a second reader of a queue the
                # child still reads.)
                child.paused_until = now + _NACK_PAUSE
            else:
                self._hung_up(child)    # EPIPE, ECONNRESET: it hung up
            return False
        _close_fds(batch)       # the child's queue holds them now
        # The ledger, for the least loaded, the hang check and the status
        # (pruned by unreceived(), at the latest when the counts are published).
        child.queued.append(room)
        child.unread += room
        child.sent += room
        if self._hang_timeout is not None and child.deadline is None:
            child.waiting_since = now
            child.deadline = now + self._hang_timeout / 4
        self.forwarded += room
        if self._debug:
            _log.debug("sent child %d %d connections (fds %s)", child.pid, room, batch)
        return True

    def unblocked(self, child: _Child) -> None:
        """EVENT_WRITE: the child's channel has room again."""
        child.blocked = False
        self._sel.modify(child.channel, _IN)

    def unreceived(self, child: _Child) -> int:
        """Forget what the child has received since last asked; what is left unread."""
        if child.inbox is None:
            return child.unread
        left = _unread_bytes(child.inbox) // len(self._message)
        while len(child.queued) > left:
            child.unread -= child.queued.popleft()
        return child.unread

    def watch(self, child: _Child, now: float) -> Optional[bool]:
        """--hang-timeout: True if the child took nothing for that long while
        some waited for it; else look again later (None: nothing waits)."""
        if child.inbox is None:
            return None
        before = len(child.queued)
        self.unreceived(child)
        if len(child.queued) < before:
            child.waiting_since = now   # it took some
        if not child.queued:
            return None                 # nothing waits: watch again after the next send
        if now - child.waiting_since >= self._hang_timeout:
            return True
        child.deadline = now + self._hang_timeout / 4
        return False

    # -- taking back --------------------------------------------------------

    def reclaim(self, child: _Child, report: bool = True) -> bool:
        """Take back what waits in a child's queue, to the front of ours.

        Only when nobody will receive from it: the child exited (and nothing
        it forked holds the channel), hung up, or stalled waiting for our
        b"K".  True once the queue is empty; False if we ran short of
        descriptors, and then it is tried again after the accept pause.
        """
        inbox = child.inbox
        if inbox is None:
            return True
        taken: List[int] = []
        complete = False
        while True:
            try:
                msg, fds, truncated = _peek_message(inbox)
            except BlockingIOError:
                complete = True
                break
            if truncated:
                # Out of descriptors ourselves: park what we hold (what was
                # taken back so far, then our queue) and look again; if
                # nothing could be parked, try again shortly.
                _close_fds(fds)
                moved = self._park(taken)
                del taken[:moved]
                if not taken:
                    moved += self._park_waiting()
                if moved:
                    continue
                self.accept_paused_until = time.monotonic() + _ACCEPT_PAUSE
                break
            if not msg and not fds:
                complete = True
                break
            _consume_message(inbox)
            if msg[:1] == _MSG_CONNS:
                taken += fds
            else:
                _close_fds(fds)
        if taken and report:
            _log.info("child %d had not taken %s; they go to %s", child.pid,
                      _plural(len(taken), "connection"),
                      "the other workers" if len(self.takers) > 1 else "the next child")
        self.waiting.extendleft(reversed(taken))
        child.queued.clear()
        child.unread = 0
        child.reclaimed += len(taken)
        if not complete:
            if child not in self.take_back:
                _log.warning("cannot take back all of child %d's queue: out of descriptors; "
                             "retrying every %g s", child.pid, _ACCEPT_PAUSE)
                self.take_back.append(child)
            return False
        if child in self.take_back:
            self.take_back.remove(child)
        if child.state is _State.EXITED:
            inbox.close()
            child.inbox = None
        return True

    def parked(self) -> int:
        return sum(self.spilled) if self.spilled else 0

    def _park(self, fds: List[int]) -> int:
        """Move connections out of our descriptor table into the spill
        socketpair, in messages of up to _MAX_BATCH; how many moved (the
        first ones; the rest stay ours)."""
        moved = 0
        while self.spill is not None and moved < len(fds):
            batch = fds[moved:moved + _MAX_BATCH]
            try:
                _send_fds(self.spill[0], self._message, batch)
            except OSError:
                break           # full, or too many descriptors in flight: keep them
            _close_fds(batch)
            self.spilled.append(len(batch))
            moved += len(batch)
        return moved

    def _park_waiting(self) -> int:
        fds = list(self.waiting)
        moved = self._park(fds)
        for _ in range(moved):
            self.waiting.popleft()
        return moved

    def _unpark(self) -> None:
        """Parked connections back to the front of our queue, while it holds
        less than a batch and we have descriptors to spare."""
        back: List[int] = []
        while self.spilled and len(self.waiting) + len(back) < _MAX_BATCH:
            try:
                msg, fds, truncated = _peek_message(self.spill[1])
            except BlockingIOError:
                self.spilled.clear()        # never: each size stands for a message
                break
            if truncated:
                _close_fds(fds)
                self.accept_paused_until = time.monotonic() + _ACCEPT_PAUSE
                break
            _consume_message(self.spill[1])
            self.spilled.popleft()
            back += fds
        self.waiting.extendleft(reversed(back))

    def restored(self) -> None:
        """After an upgrade from a version without a spill socketpair."""
        if self._forwarding and self.spill is None:
            self.spill = _spill_pair()

    def nacked(self, child: _Child) -> None:
        """The child has no room for the descriptors at the head of its queue:
        take the queue back (it receives nothing until our b"K") and send it
        again in smaller messages, after a pause."""
        child.stalled = True
        before = child.reclaimed
        complete = self.reclaim(child, report=False)
        # Once per child at warning: at its limit it may ask every pause.
        _log.log(logging.DEBUG if child.nacked else logging.WARNING,
                 "child %d could not receive %s; sending them again", child.pid,
                 _plural(child.reclaimed - before, "connection") if complete else
                 "the connections sent to it")
        child.nacked = True
        if complete:
            self.resume(child)
        # else b"K" would queue behind what is left: it goes once that is taken back

    def resume(self, child: _Child) -> None:
        """The stalled child's queue is empty: b"K", and smaller messages after a pause."""
        child.stalled = False
        if child.channel is None:
            return
        try:
            child.channel.send(_MSG_RESUME)
        except OSError:
            self._hung_up(child)
            return
        child.paused_until = time.monotonic() + _NACK_PAUSE
        # Smaller messages, or one that never fits would be refused forever.
        child.batch_limit = max(1, child.batch_limit // 2)

    def exited(self, child: _Child) -> None:
        """The child is gone: its queue comes back, unless what it forked holds it."""
        if not self.check_holders(child):
            self.reclaim(child)

    def check_holders(self, child: _Child) -> bool:
        """After the child exited: do processes it started still hold its
        channel?  Then they may still receive from it, and taking the queue
        back would race with them (peek and receive are two calls): it stays
        theirs until they are gone.  True while any holds it."""
        holders = []
        if child.inbox is not None and _unread_bytes(child.inbox):
            holders = _processes_holding({_inode(child.inbox)},
                                         self.own_pids())
        if not holders:
            self._stop_watching_holders(child)
            if child in self.deferred:
                self.deferred.remove(child)
                self.reclaim(child)
            return False
        if child not in self.deferred:
            self.deferred.append(child)
            _log.warning("child %d exited, but process %s started by it still holds its "
                         "channel (does the command fork instead of exec?); what it has not "
                         "received stays with it until it exits", child.pid,
                         ", ".join(map(str, holders)))
        for pid in holders:
            if pid not in child.holders:
                child.holders[pid] = self._watch_process(
                    pid, functools.partial(self._holder_exited, child))
        for pid in [p for p in child.holders if p not in holders]:
            self._unwatch_process(child.holders.pop(pid))
        return True

    def _holder_exited(self, child: _Child, mask: int = 0) -> None:
        self.check_holders(child)

    def _watch_process(self, pid: int, callback) -> int:
        """A pidfd that becomes readable when pid exits, in the selector; -1
        (and a look every second) where pidfds do not exist."""
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            if self.holders_check_at is None:
                self.holders_check_at = time.monotonic() + 1.0
            return -1
        self._sel.register(fd, _IN, callback)
        return fd

    def _unwatch_process(self, fd: int) -> None:
        if fd >= 0:
            self._sel.unregister(fd)
            os.close(fd)

    def _stop_watching_holders(self, child: _Child) -> None:
        for fd in child.holders.values():
            self._unwatch_process(fd)
        child.holders.clear()

    def close(self, children: List[_Child]) -> None:
        """At exit: what no child took is closed, and so is every inbox."""
        self.close_listeners()
        left = len(self.waiting) + self.parked()
        if left:
            _log.warning("closing %d connections no child took", left)
        _close_fds(self.waiting)
        self.waiting.clear()
        for sock in self.spill or ():
            sock.close()            # and with them what is parked there
        self.spill = None
        self.spilled.clear()
        for child in [*children, *self.take_back, *self.deferred]:
            self._stop_watching_holders(child)
            if child.inbox is not None:
                child.inbox.close()     # what it holds, nobody will take now
                child.inbox = None


# ---------------------------------------------------------------------------
# The daemon: steering new connections to one generation (activation)
# ---------------------------------------------------------------------------


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def _ns(seconds: Optional[float]) -> Optional[int]:
    """A time.monotonic() as CLOCK_MONOTONIC ns, as the status publishes times; None for none."""
    return int(seconds * 1e9) if seconds else None


def _tcp_sockets(families=(socket.AF_INET, socket.AF_INET6),
                 listening_only: bool = False) -> Iterator[tuple]:
    """(family, fields of its line) for each TCP socket of this network
    namespace, from /proc/net/tcp and tcp6 (one unreadable: none of it).
    listening_only: the LISTEN lines, which come first; no more is read."""
    for family, path in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        if family not in families:
            continue
        try:
            with open(path) as f:
                next(f, None)
                for line in f:
                    fields = line.split(None, 10)
                    if listening_only and (len(fields) < 10 or fields[3] != "0A"):
                        break
                    yield family, fields
        except OSError:
            pass


def _listening_backlogs() -> dict:
    """{inode: connections waiting to be accepted} for every TCP socket
    listening in this network namespace (a LISTEN line's rx_queue)."""
    found = {}
    for _, fields in _tcp_sockets(listening_only=True):
        try:
            found[int(fields[9])] = int(fields[4].partition(":")[2], 16)
        except ValueError:
            pass
    return found


# sock_diag (netlink): the kernel lists just the sockets asked for.
_NETLINK_SOCK_DIAG = getattr(socket, "NETLINK_SOCK_DIAG", 4)
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_INET_DIAG_REQ_BYTECODE = 1
_INET_DIAG_BC_S_GE, _INET_DIAG_BC_S_LE = 2, 3
_TCP_ESTABLISHED, _TCP_CLOSE_WAIT = 1, 8
_DIAG_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")    # struct inet_diag_msg


def _unaccepted_by_diag(family: int, port: int) -> Iterator[tuple]:
    """(local address, remote address, remote port) of each TCP connection to
    a local port that no process holds yet (inode 0: in an accept queue),
    established or half-closed by its client, as sock_diag lists them:
    the kernel filters by state and port, so the cost does not grow with
    the namespace's other sockets (/proc/net/tcp* lists every one, TIME_WAIT
    too: under load tens of thousands of lines, seconds to read).  OSError
    where netlink is refused."""
    # Bytecode: local port >= port and <= port, else reject (a jump past the end).
    bytecode = struct.pack("=BBHHHBBHHH", _INET_DIAG_BC_S_GE, 8, 20, 0, port,
                           _INET_DIAG_BC_S_LE, 8, 12, 0, port)
    request = struct.pack("=BBBBI48s", family, socket.IPPROTO_TCP, 0, 0,
                          (1 << _TCP_ESTABLISHED) | (1 << _TCP_CLOSE_WAIT), b"")
    request += struct.pack("=HH", 4 + len(bytecode), _INET_DIAG_REQ_BYTECODE) + bytecode
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY,
                         _NLM_F_REQUEST_DUMP, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(header + request, (0, 0))
        while True:
            data = nl.recv(1 << 16)
            if not data:
                return
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == _NLMSG_DONE:
                    return
                if kind == _NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset + 16)[0]
                    raise OSError(code, os.strerror(code))
                if kind == _SOCK_DIAG_BY_FAMILY and length >= 16 + _DIAG_MSG.size:
                    (_, state, _, _, _, dport, src, dst, _, _, _, _, _, _,
                     inode) = _DIAG_MSG.unpack_from(data, offset + 16)
                    if inode == 0 and state in (_TCP_ESTABLISHED, _TCP_CLOSE_WAIT):
                        size = 4 if family == socket.AF_INET else 16
                        yield src[:size], dst[:size], int.from_bytes(dport, "big")
                offset += max(16, (length + 3) & ~3)


def _proc_address(text: str) -> bytes:
    """An address as /proc/net/tcp* writes it (host-order 32-bit words, in
    hex), in network order."""
    return b"".join(struct.pack("=I", int(text[i:i + 8], 16)) for i in range(0, len(text), 8))


class _QueueWatch:
    """--hang-timeout where the servers accept for themselves (listener and
    activation modes): how long the serving generation has accepted none of
    the connections waiting for it.  Its queue's length is read first (cheap:
    TCP_INFO); only when something waits are the waiting connections listed
    (sock_diag, else /proc/net/tcp*), where one has inode 0 until a process
    accepts it.  Progress is a queue shorter than at the last look plus
    what has been listed since.  A long queue alone would not do: an
    overloaded healthy server keeps one, but keeps taking from it."""

    def __init__(self, listeners: List[socket.socket]) -> None:
        # The local addresses to look for: (family, address in network
        # order or None for any, port).
        self.ends = set()
        for sock in listeners:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                host, port = sock.getsockname()[:2]
                wildcard = host in ("0.0.0.0", "::") or sock.family == socket.AF_INET6
                self.ends.add((sock.family, None if wildcard else socket.inet_aton(host), port))
        # Listed by sock_diag, else (refused: said once) from /proc/net/tcp*.
        self.diag = True
        self.seen: set = set()          # _waiting() at the last look
        self.backlog = 0                # the sockets' queue at the last look
        self.progress_at: Optional[float] = None
        self.look_at: Optional[float] = None

    def stalled(self, now: float, sockets: List[socket.socket]) -> float:
        """Seconds the connections waiting on these sockets have seen no
        accept (0: none waits, or one was accepted since the last look)."""
        if not any(_backlog_length(sock) for sock in sockets):
            self.reset()        # the clock starts when something is seen waiting
            return 0.0
        # A queue shrinks only by accept(): a connection its client resets
        # stays in it (and is accepted, reset), but leaves the kernel's
        # lists, so one seen and gone now may not have been accepted.  What
        # is new in the listing arrived since the last look (at least: some
        # arrive and are accepted, or reset, in between): a queue shorter
        # than the last one plus those has had an accept.  The queue is read
        # after the listing, so what arrives meanwhile makes it only longer.
        waiting = self._waiting()
        backlog = sum(_backlog_length(sock) or 0 for sock in sockets)
        if (self.progress_at is None or not backlog
                or backlog < self.backlog + len(waiting - self.seen)):
            self.progress_at = now
        self.seen, self.backlog = waiting, backlog
        return now - self.progress_at

    def reset(self) -> None:
        self.seen, self.progress_at, self.backlog = set(), None, 0

    def _waiting(self) -> set:
        """(family, local address, port, remote address, port) of each
        connection waiting in an accept queue at one of our addresses."""
        if self.diag:
            try:
                return {(family, local, port, remote, remote_port)
                        for family, port in {(family, port) for family, _, port in self.ends}
                        for local, remote, remote_port in _unaccepted_by_diag(family, port)
                        if any(f == family and p == port and a in (None, local)
                               for f, a, p in self.ends)}
            except OSError as e:
                self.diag = False
                _log.warning("--hang-timeout: sock_diag refused (%s): waiting connections "
                             "are listed from /proc/net/tcp, whose cost grows with every "
                             "socket of the host, TIME_WAIT too", e.strerror or e)
        found = set()
        for family, fields in _tcp_sockets({family for family, _, _ in self.ends}):
            # ESTABLISHED or CLOSE_WAIT (the client has sent all and
            # half-closed), owned by no process: in an accept queue.
            if len(fields) < 10 or fields[9] != "0" or fields[3] not in ("01", "08"):
                continue
            host, _, port = fields[1].rpartition(":")
            remote, _, remote_port = fields[2].rpartition(":")
            key = (family, _proc_address(host), int(port, 16), _proc_address(remote),
                   int(remote_port, 16))
            if any(f == family and key[2] == p and h in (None, key[1]) for f, h, p in self.ends):
                found.add(key)
        return found


def _migrates_queues() -> bool:
    """Whether a listening socket closed moves its accept queue to another of
    its SO_REUSEPORT group (Linux 5.14+, per network namespace)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _listening_inodes() -> set:
    """The inodes of every TCP socket listening in this network namespace."""
    return set(_listening_backlogs())


def _listen_beside(sock: socket.socket, backlog: int) -> socket.socket:
    """A new listening socket on sock's address, in its SO_REUSEPORT group."""
    return _listen_at(_where(sock), backlog)


def _where(sock: socket.socket) -> tuple:
    """What _listen_at() needs to listen beside sock: (family, address, IPV6_V6ONLY)."""
    return (sock.family, sock.getsockname(),
            sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            if sock.family == socket.AF_INET6 else None)


def _listen_at(where: tuple, backlog: int) -> socket.socket:
    """A new listening socket at _where()'s address, joining its SO_REUSEPORT group."""
    family, address, v6only = where
    new = socket.socket(family, socket.SOCK_STREAM)
    try:
        new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if v6only is not None:
            new.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        new.bind(address)
        new.listen(backlog)
    except BaseException:
        new.close()
        raise
    new.setblocking(True)       # as the servers get it
    return new


class _HelperGone(Exception):
    """The socket helper did not answer: why, as the end of a sentence."""


class _SocketHelper:
    """--user with steering: a process that keeps root, forked before
    the daemon drops it, whose only job is to make the listening sockets of
    a new generation, beside the daemon's own (a group of SO_REUSEPORT
    sockets must all belong to one user, and a port below 1024 needs
    root).  It is given the addresses at the fork and nothing else (every
    other descriptor closed, standard ones on /dev/null); each request (one
    byte on a private socketpair) gets one socket per address, sent back
    and closed at once (a copy it kept would stay in the group), or the
    errno that refused them.  It exits when the daemon's end closes (the
    daemon stops, or is killed).

    The daemon calls make() (blocking, _HELPER_TIMEOUT at most), abandon()
    when it will ask no more, stop() at exit; its waitpid() loop reaps it."""

    def __init__(self, pid: int, channel: Optional[socket.socket]) -> None:
        self.pid: Optional[int] = pid   # None once reaped
        self.channel = channel          # None once abandoned
        if channel is not None:
            channel.settimeout(_HELPER_TIMEOUT)

    @classmethod
    def start(cls, anchors: List[socket.socket], backlog: int) -> "_SocketHelper":
        """Fork it, beside these sockets (OSError if it cannot be)."""
        places = [_where(sock) for sock in anchors]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
            if pid == 0:
                status = 1
                try:
                    _help_make_sockets(theirs.fileno(), places, backlog)
                    status = 0
                finally:
                    os._exit(status)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        _log.info("socket helper %d started: it keeps root to open each new generation's "
                  "listening sockets", pid)
        return cls(pid, ours)

    def make(self, count: int) -> List[socket.socket]:
        """One new listening socket per address, in the order given at the
        start; OSError with the errno that refused them; _HelperGone if it
        does not answer (the caller abandons it)."""
        if self.channel is None:
            raise _HelperGone("was abandoned")
        try:
            self.channel.send(b"o")
            msg, fds, flags, _ = socket.recv_fds(self.channel, 64, count)
        except socket.timeout:
            raise _HelperGone(f"did not answer within {_HELPER_TIMEOUT:g} s") from None
        except OSError as e:
            raise _HelperGone(f"cannot be reached: {e.strerror}") from None
        sockets = []
        for fd in fds:
            os.set_inheritable(fd, False)
            sockets.append(socket.socket(fileno=fd))
        if msg == b"k" and len(sockets) == count and not flags & _TRUNCATED:
            for sock in sockets:
                sock.setblocking(True)
            return sockets
        for sock in sockets:
            sock.close()
        if msg[:1] == b"e" and msg[1:].isdigit():
            code = int(msg[1:])
            raise OSError(code, os.strerror(code))
        raise _HelperGone("has exited" if not msg else
                          f"answered {msg[:16]!r} with {len(sockets)} of {count} sockets")

    def abandon(self) -> None:
        """Ask no more: its channel closed, it SIGKILLed where we may (no
        longer root, we may not: it exits at the EOF once it runs, and
        with the daemon in any case); reaped by the loop."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)   # not yet reaped: the pid is still its
            except OSError:
                pass

    def stop(self) -> None:
        """At exit: EOF on its channel, which it exits at; SIGKILL if it has
        not within _HELPER_TIMEOUT, and reaped if gone.  Never waits longer:
        one we may not kill (stopped by root, and we no longer root) exits
        at the EOF once it runs again (a parent-death signal would not
        reach it either: the kernel checks the dying parent's right)."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            fd = -1
        exited = False
        if fd >= 0:
            try:
                exited = bool(select.select([fd], [], [], _HELPER_TIMEOUT)[0])
            finally:
                os.close(fd)
        if not exited:
            try:
                os.kill(pid, signal.SIGKILL)
                exited = True
            except OSError as e:
                _log.warning("socket helper %d did not exit within %g s and cannot be "
                             "killed (%s): it exits once it runs again", pid, _HELPER_TIMEOUT,
                             e.strerror)
        try:
            os.waitpid(pid, 0 if exited else os.WNOHANG)
        except ChildProcessError:
            pass


def _help_make_sockets(channel_fd: int, places: List[tuple], backlog: int) -> None:
    """The socket helper's life, in the forked child (see _SocketHelper):
    shed what the daemon holds, then answer requests until EOF."""
    os.setsid()         # the terminal's signals are for the daemon, which stops it
    for sig in _HANDLED_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if channel_fd != 3:
        os.dup2(channel_fd, 3, inheritable=False)
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 3:
            try:
                os.close(int(name))
            except OSError:
                pass        # the directory listdir() read, closed already
    try:
        with open("/proc/self/comm", "wb") as f:
            f.write(_HELPER_NAME)       # as ps and top show it
    except OSError:
        pass
    channel = socket.socket(fileno=3)
    while True:
        request = channel.recv(16)
        if request != b"o":
            return          # EOF: the daemon has closed its end, or is gone
        made: List[socket.socket] = []
        try:
            for where in places:
                made.append(_listen_at(where, backlog))
            reply = b"k"
        except OSError as e:
            reply = b"e%d" % (e.errno or errno.EIO)
        try:
            _send_fds(channel, reply, [sock.fileno() for sock in made] if reply == b"k" else [])
        finally:
            for sock in made:
                sock.close()


class _Steering:
    """Activation and listener modes: each generation after the first
    listens on sockets of its own (handed to a listener-mode child over its
    channel), which join the SO_REUSEPORT group of the daemon's socket for
    the same address; a one-instruction classic BPF program on each group
    returns the index of the serving generation's socket, so every new
    connection goes to it and an old generation gets nothing new once its
    successor serves (it accepts what waits in its own backlog, then stops).

    The kernel indexes a group's sockets in the order they joined; when one
    leaves (its last holder closes it) the last one takes its place.  The
    program must stay right at every instant, so a socket steered to is
    never moved: a retired generation's socket is let go of only when that
    moves nothing steered to (it is the last, or the one steered to is
    not), else it is kept, idle, until a newer one joins.  ``groups``
    models each group (inodes in index order); one the daemon let go of
    that still listens (a process left behind holds it) stays in the model
    (``ghosts``, in the order let go of) until it no longer does.
    """

    def __init__(self, anchors: List[socket.socket], backlog: int, attach: bool = True,
                 helper: Optional[_SocketHelper] = None) -> None:
        """attach false: after an upgrade, the restore sets the groups and
        steers (the program on the sockets steers meanwhile).  helper: what
        makes the new sockets (--user), else the daemon does."""
        self.anchors = anchors                   # the daemon's own sockets (the first generation's)
        self.backlog = backlog
        self.helper = helper
        # Why new generations share the serving one's sockets from now on
        # (the socket helper is gone); None while each gets its own.
        self.off: Optional[str] = None
        self.groups: List[List[int]] = [[_inode(sock)] for sock in anchors]
        self.targets: List[int] = [group[0] for group in self.groups]   # steered to, per group
        self.steered: List[socket.socket] = list(anchors)   # those sockets, held by the daemon
        # While the one steered to gets only a share (1 in _SHARE): per group,
        # the socket that gets the rest (the generation before it: the
        # supervisor's fallback, whose sockets it holds till the share ends).
        self.previous: Optional[List[int]] = None
        self.retired: List[socket.socket] = []   # let go of when that moves nothing steered to
        self.ghosts: List[int] = []
        # The anchors' generation is gone (idle), and they have left their
        # groups (out: shutdown(SHUT_RD), which a closed listener's queue
        # migrating by hash must not land on).
        self.anchors_idle = False
        self.anchors_out = False
        if attach:
            self.attach()

    def open(self) -> List[socket.socket]:
        """A new generation's sockets, one per address; OSError if the kernel refuses."""
        if self.off is not None:
            raise OSError(errno.EPIPE, self.off)
        sockets: List[socket.socket] = []
        if self.helper is not None:
            try:
                sockets = self.helper.make(len(self.anchors))
            except _HelperGone as e:
                self._lose_helper(f"socket helper {self.helper.pid} {e}")
                raise OSError(errno.EPIPE, self.off) from None
        try:
            for anchor in self.anchors[len(sockets):]:
                sockets.append(_listen_beside(anchor, self.backlog))
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        for group, sock in zip(self.groups, sockets):
            group.append(_inode(sock))
        return sockets

    def steer(self, sockets: Optional[List[socket.socket]],
              previous: Optional[List[socket.socket]] = None) -> None:
        """Every new connection to the given sockets (None: the daemon's own);
        with previous, only one in _SHARE, and the rest to those."""
        self.steered = list(sockets or self.anchors)
        self.targets = [_inode(sock) for sock in self.steered]
        self.previous = None if previous is None else [_inode(sock) for sock in previous]
        self.attach()

    def _steered_to(self, g: int) -> tuple:
        """The sockets of group g that new connections go to: none may move."""
        return (self.targets[g],) if self.previous is None else (self.targets[g],
                                                                 self.previous[g])

    def release(self, sockets: List[socket.socket]) -> None:
        """A generation is gone: its sockets leave their groups, in time (prune())."""
        self.retired += sockets

    def take_out(self, sockets: List[socket.socket]) -> None:
        """A hung generation's sockets leave their groups at once
        (shutdown(SHUT_RD)), though its processes still hold them: what
        waits on them moves to another of the group (tcp_migrate_req) or
        is reset, and _let_go_of() says which.  Never one steered to."""
        for sock in sockets:
            inode = _inode(sock)
            g = next((i for i, group in enumerate(self.groups) if inode in group), None)
            if g is None or inode in self._steered_to(g):
                continue
            group = self.groups[g]
            self._let_go_of(sock)
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError as e:
                _log.warning("cannot take a hung generation's listening socket out of its "
                             "group: %s", e.strerror)
                continue
            i = group.index(inode)
            group[i] = group[-1]
            group.pop()
            if any(sock is anchor for anchor in self.anchors):
                self.anchors_out = True
        self.attach()

    def recheck(self) -> None:
        """A process left behind has been reaped: did a ghost leave with it?"""
        if self.ghosts:
            self._settle()

    def inodes(self) -> set:
        return {inode for group in self.groups for inode in group}

    def reaped(self, pid: int, status: int) -> bool:
        """Whether a process reaped was the socket helper (then gone: one line,
        unless it was abandoned and said so already)."""
        if self.helper is None or pid != self.helper.pid:
            return False
        self.helper.pid = None
        if self.off is None:
            self._lose_helper(f"socket helper {pid} {_describe_status(status)}")
        self.helper.abandon()
        self.helper = None
        return True

    def _lose_helper(self, what: str) -> None:
        """No socket helper from now on: restarts share the serving generation's sockets."""
        self.off = f"--user: {what}"
        _log.warning("%s: new generations share the serving one's listening sockets from now "
                     "on (an old server may take new connections until it stops)", what)
        self.helper.abandon()

    def close(self) -> None:
        for sock in self.retired:
            sock.close()
        self.retired = []
        if self.helper is not None:
            self.helper.stop()
            self.helper = None

    def prune(self) -> None:
        """Let go of the retired sockets whose leaving moves nothing steered
        to.  Only while no child of the daemon is between fork and exec:
        such a child holds a copy of every socket, and the one let go of
        would leave the group later, when it execs, unseen."""
        for sock in list(self.retired):
            inode = _inode(sock)
            g = next((i for i, group in enumerate(self.groups) if inode in group), None)
            if g is None:       # taken out already (take_out())
                self.retired.remove(sock)
                sock.close()
                continue
            if self.groups[g][-1] in self._steered_to(g) and len(self.groups[g]) > 2:
                continue        # the socket steered to would take its place (alone, it
                                # gets everything the program's stale index sends on)
            self.retired.remove(sock)
            self._let_go_of(sock)
            sock.close()
            self.ghosts.append(inode)
            self._settle()
        if (self.anchors_idle and not self.anchors_out
                and all(group[-1] not in self._steered_to(g) or len(group) <= 2
                        for g, group in enumerate(self.groups))):
            for sock, group in zip(self.anchors, self.groups):
                if sock.fileno() < 0:
                    continue        # shutting down: closed already
                self._let_go_of(sock)
                try:
                    sock.shutdown(socket.SHUT_RD)   # out of its group at once
                except OSError as e:
                    _log.warning("cannot take the first generation's listening socket out of "
                                 "its group: %s", e.strerror)
                    continue
                i = group.index(_inode(sock))
                group[i] = group[-1]
                group.pop()
            self.anchors_out = True
            self.attach()

    @staticmethod
    def _let_go_of(sock: socket.socket) -> None:
        """Say what waits on a listening socket about to leave its group."""
        waiting = _backlog_length(sock)
        if waiting:
            one = waiting == 1
            _log.warning("%s waiting on a listening socket let go of %s", _plural(
                waiting, "connection"),
                f"{'moves' if one else 'move'} to another of its group "
                f"(net.ipv4.tcp_migrate_req)" if _migrates_queues() else
                f"{'is' if one else 'are'} reset: net.ipv4.tcp_migrate_req is off")

    def _settle(self) -> None:
        """The kernel's rule, in order, for each ghost that no longer listens."""
        listening = _listening_inodes()
        moved = False
        for inode in [g for g in self.ghosts if g not in listening]:
            self.ghosts.remove(inode)
            for g, group in enumerate(self.groups):
                if inode in group:
                    i = group.index(inode)
                    moved = moved or group[-1] in self._steered_to(g)
                    group[i] = group[-1]
                    group.pop()
        if moved:
            self.attach()       # only a ghost that left late can have moved it

    def attach(self) -> None:
        _log.debug("steering: group members (inodes) %s; new connections to %s%s", self.groups,
                   self.targets, "" if self.previous is None else
                   f", 1 in {_SHARE} (the rest to {self.previous})")
        # Through the socket steered to: the daemon holds it as long as it serves.
        for g, (sock, group, target) in enumerate(zip(self.steered, self.groups, self.targets)):
            if sock.fileno() < 0:
                continue        # shutting down: closed already
            program = [(_BPF_RET_K, 0, 0, group.index(target))]
            if self.previous is not None:
                # A random word (prandom: loopback and any NIC alike); its low
                # bits all clear one time in _SHARE: the new socket, else the old.
                program = [(_BPF_LD_W_ABS, 0, 0, _SKF_AD_RANDOM),
                           (_BPF_JSET_K, 1, 0, _SHARE - 1),
                           *program,
                           (_BPF_RET_K, 0, 0, group.index(self.previous[g]))]
            code = array.array("B", b"".join(struct.pack("=HBBI", *op) for op in program))
            address, _ = code.buffer_info()
            sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF,
                            struct.pack("@HP", len(program), address))


# ---------------------------------------------------------------------------
# The daemon: what an upgrade carries across its exec
# ---------------------------------------------------------------------------
#
# One declaration per class: which attributes cross the exec and how
# (_Kind), and which do not and why.  Export, the check's typed reading and
# the restore are all derived from it, and a test compares the declaration
# with the attributes live objects really have, so a field added and not
# declared fails it.


class _Kind:
    """How one kind of attribute crosses the exec: dump (to JSON, keeping its
    descriptors open through keep()), load (typed, from JSON: the upgrade
    check runs this on the real state, without descriptors), adopt (what
    load gave, as live objects in the new process; refs finds children by
    pid and generations by number).  ``missing``: the value when a state
    written by an older version lacks the attribute (by default it must be
    there)."""

    def __init__(self, dump, load, adopt=None, missing=KeyError) -> None:
        self.dump, self.load = dump, load
        self.adopt = adopt or (lambda value, refs: value)
        self.missing = missing


def _optional(convert):
    return lambda value: None if value is None else convert(value)


def _as_is(value, keep):
    return value


def _table(convert, missing=KeyError) -> _Kind:
    """A dict slot (or pid) -> number, as sorted pairs."""
    return _Kind(lambda value, keep: sorted(value.items()),
                 lambda pairs: {int(k): _optional(convert)(v) for k, v in pairs},
                 lambda table, refs: dict(table), missing)


_INT = _Kind(_as_is, int)
_PATH = _Kind(_as_is, _optional(str), missing=None)
_TEXT = _PATH                                               # any text new versions carry
_COUNT = _Kind(_as_is, int, missing=0)                      # a count new versions carry
_LATER = _Kind(_as_is, _optional(float), missing=None)     # a time new versions carry
_INODES = _Kind(lambda inodes, keep: list(inodes), lambda inodes: [int(n) for n in inodes])
_GROUPS = _Kind(lambda groups, keep: [list(g) for g in groups],
                lambda groups: [[int(n) for n in g] for g in groups])
_FLAG = _Kind(_as_is, bool)
_LATER_FLAG = _Kind(_as_is, bool, missing=False)    # a flag new versions carry
_NUMBER = _Kind(_as_is, _optional(float))           # times (CLOCK_MONOTONIC) and the like
_FD = _Kind(lambda fd, keep: keep(fd), _optional(int), lambda fd, refs: _adopt_fd(fd))
_SOCKET = _Kind(lambda sock, keep: keep(sock), _optional(int),
                lambda fd, refs: _adopt_socket(fd))
_SOCKETS = _Kind(lambda socks, keep: None if socks is None else [keep(s) for s in socks],
                 _optional(lambda fds: [int(fd) for fd in fds]),
                 lambda fds, refs: None if fds is None else [_adopt_socket(fd) for fd in fds],
                 missing=None)
_FDS = _Kind(lambda fds, keep: [keep(fd) for fd in fds], lambda fds: [int(fd) for fd in fds],
             lambda fds, refs: collections.deque(_adopt_fd(fd) for fd in fds))
_STATE = _Kind(lambda state, keep: state.value, _State)
def _counts(missing=KeyError) -> _Kind:
    """A deque of counts, as a list."""
    return _Kind(lambda counts, keep: list(counts), lambda counts: [int(n) for n in counts],
                 lambda counts, refs: collections.deque(counts), missing)


_COUNTS = _counts()
_HEX = _Kind(lambda data, keep: data.hex(), bytes.fromhex)
_GENERATION = _Kind(lambda g, keep: None if g is None else g.number, _optional(int),
                    lambda number, refs: None if number is None else refs["generations"][number])
_FALLBACK = _Kind(_GENERATION.dump, _GENERATION.load, _GENERATION.adopt, missing=None)
_SLOTS = _Kind(lambda slots, keep: [None if c is None else c.pid for c in slots],
               lambda pids: [None if pid is None else int(pid) for pid in pids],
               lambda pids, refs: [None if pid is None else refs["children"].get(pid)
                                   for pid in pids])
_CHILDREN = _Kind(lambda children, keep: [c.pid for c in children],
                  lambda pids: [int(pid) for pid in pids],
                  lambda pids, refs: [refs["children"][pid] for pid in pids
                                      if pid in refs["children"]])


def _fields(prefix: str = "", **kinds: _Kind) -> dict:
    """{state key: (attribute, kind)}; the attribute is the key after prefix."""
    return {key: (prefix + key, kind) for key, kind in kinds.items()}


_CHILD_STATE = _fields(
    pid=_INT, index=_INT, generation=_GENERATION, state=_STATE, started=_NUMBER,
    ready_at=_NUMBER, retired_at=_NUMBER, report_at=_NUMBER, deadline=_NUMBER,
    kill_at=_NUMBER, paused_until=_NUMBER, batch_limit=_INT, blocked=_FLAG, stalled=_FLAG,
    nacked=_FLAG, queued=_COUNTS, unread=_INT, waiting_since=_NUMBER, reclaimed=_INT,
    exec_error=_HEX, assume_ready_at=_NUMBER, look_at=_LATER, notified=_LATER_FLAG,
    sent=_COUNT, ready_by=_TEXT, cwd=_PATH, channel=_SOCKET, inbox=_SOCKET, notify=_SOCKET,
    exec_report=_FD)
_GENERATION_STATE = _fields(
    number=_INT, serving=_FLAG, slots=_SLOTS, respawn_at=_table(float),
    backoff=_table(float), quick_deaths=_table(int), sockets=_SOCKETS, look_at=_LATER,
    quiet_at=_LATER, quiet_limit=_LATER, probation_until=_LATER, hung=_LATER_FLAG,
    unproven=_LATER_FLAG, backlog_seen=_COUNT, stalled_since=_LATER)
_HELPER = _Kind(lambda helper, keep: None if helper is None else [helper.pid,
                                                                   keep(helper.channel)],
                _optional(lambda pair: [int(pair[0]), _optional(int)(pair[1])]),
                lambda pair, refs: None if pair is None else _SocketHelper(
                    pair[0], _adopt_socket(pair[1])), missing=None)
_STEERING_STATE = _fields(groups=_GROUPS, targets=_INODES, ghosts=_INODES, retired=_SOCKETS,
                          anchors_idle=_LATER_FLAG, anchors_out=_LATER_FLAG, helper=_HELPER,
                          off=_TEXT,
                          previous=_Kind(lambda inodes, keep: None if inodes is None
                                         else list(inodes),
                                         _optional(lambda inodes: [int(n) for n in inodes]),
                                         missing=None))
_QUEUE_STATE = _fields(
    waiting=_FDS, take_back=_CHILDREN, deferred=_CHILDREN, accept_paused_until=_NUMBER,
    forwarded=_INT, spill=_SOCKETS, spilled=_counts(missing=()))
_SUPERVISOR_STATE = {
    **_fields("_", workers=_INT, generation_count=_INT, ever_ready=_FLAG,
              restart_again=_FLAG, restart_open=_FLAG),
    **_fields("_", serving=_GENERATION, starting=_GENERATION, notify_dir=_PATH,
              fallback=_FALLBACK),
    **_fields(restarts=_INT, failed_restarts=_INT, crashes=_INT, hangs_replaced=_COUNT,
              failed_replacements=_COUNT)}

# Everything else each object holds, and why it need not cross.
_GIVEN = "given again: the command line, or made by the new process"
_NOT_CARRIED = {
    "child": {"on_channel": "its selector callback, made anew",
              "holders": "watched anew: check_holders() after the restore"},
    "generation": {},
    "steering": {"anchors": "the daemon's listeners, carried as such",
                 "backlog": _GIVEN,
                 "steered": "the serving generation's sockets: steer() again after the restore"},
    "queue": {
        **dict.fromkeys(("_sel", "listeners", "by_fd", "_forwarding", "_backlog",
                         "_hang_timeout", "_hung_up", "own_pids", "_message", "_debug"), _GIVEN),
        "takers": "derived from the children's states",
        "_turn": "where the next tie-break starts: any place will do",
        "listening": "derived: accepting resumes as the takers allow",
        "_accept_error": "a repeated warning may be logged once more",
        "stopping": "never: an upgrade is refused while shutting down",
        "holders_check_at": "set again by check_holders()"},
    "supervisor": {
        **dict.fromkeys(("_script", "_on_upgrade", "_restore", "_on_reopen", "_on_state",
                         "_output", "_envdir", "_forwarding", "_activation", "_ready_delay",
                         "_stop_signal", "_command", "_cwd", "_ready_timeout",
                         "_drain_timeout", "_stop_timeout", "_hang_timeout", "_on_event",
                         "_sel", "_wakeup", "_child_env"), _GIVEN),
        "_queue": "carried as its own fields (_QUEUE_STATE)",
        "_children": "carried as the list of children",
        "_upgrade": "none: the exec happens once the check is over",
        "_exec_due": "none: this is the exec",
        "_published": "published anew", "_publish_due": "published anew",
        "_published_counts": "published anew",
        "_stopping": "never: an upgrade is refused while shutting down",
        "_stop_deadline": "none: not shutting down",
        "_next_deadline": "computed anew", "_error": "none while running",
        "_listener_inodes": "derived from the listeners",
        "_strays": "found again: a process left behind is looked for at each child's exit",
        "_steering": "carried as its own fields (_STEERING_STATE)",
        "_child_nofile": "carried beside the supervisor's state (nofile)",
        "_quiet": _GIVEN, "_probation": _GIVEN, "_upgraded_from": _GIVEN,
        "last_upgrade": "made anew: the upgrade that made the new process",
        "_queue_watch": "started anew: a connection waiting across the exec is timed afresh",
        **dict.fromkeys(("_replace_after", "_replace_failures"),
                        "started anew: a failed hang replacement's back-off begins again")}}
_CARRIED = {"child": _CHILD_STATE, "generation": _GENERATION_STATE, "queue": _QUEUE_STATE,
            "supervisor": _SUPERVISOR_STATE, "steering": _STEERING_STATE}


def _dump(obj, fields: dict, keep) -> dict:
    return {key: kind.dump(getattr(obj, attr), keep) for key, (attr, kind) in fields.items()}


def _load(data: dict, fields: dict) -> dict:
    return {key: kind.load(data[key]) if key in data or kind.missing is KeyError
            else kind.missing for key, (_, kind) in fields.items()}


def _adopt(obj, loaded: dict, fields: dict, refs: dict) -> None:
    for key, (attr, kind) in fields.items():
        setattr(obj, attr, kind.adopt(loaded[key], refs))


# Of what export_state() hands over; the check confirms it.  2: parked
# connections and steering, which code reading only 1 would drop.
_STATE_VERSION = 2
_STATE_VERSIONS = (1, 2)    # the versions this code can take over from
_UPGRADE_CHECK_TIMEOUT = 15.0
ENV_UPGRADE = "SOCKETPROTECTOR_UPGRADE"     # the descriptor of the state an upgrade hands over


def _load_state(state: dict) -> dict:
    """An upgrade's state for the supervisor, checked and typed (KeyError,
    TypeError or ValueError if it is not what this code expects).  The
    check runs it on the real state before the exec, without descriptors."""
    loaded = _load(state, {**_SUPERVISOR_STATE, **_QUEUE_STATE})
    loaded["children"] = [_load(c, _CHILD_STATE) for c in state["children"]]
    loaded["generations"] = [_load(g, _GENERATION_STATE) for g in state["generations"]]
    loaded["listeners"] = [int(fd) for fd in state["listeners"]]
    loaded["steering"] = (_load(state["steering"], _STEERING_STATE) if state.get("steering")
                          else None)
    # Signals the exec interrupted (written by versions that carried them).
    loaded["pending_signals"] = [int(n) for n in state.get("pending_signals", ())]
    numbers = {g["number"] for g in loaded["generations"]}
    for c in loaded["children"]:
        if c["generation"] not in numbers:
            raise ValueError(f"child {c['pid']} of an unknown generation {c['generation']}")
    for key in ("serving", "starting"):
        if loaded[key] is not None and loaded[key] not in numbers:
            raise ValueError(f"the {key} generation {loaded[key]} is unknown")
    return loaded


# ---------------------------------------------------------------------------
# The daemon: the supervisor
# ---------------------------------------------------------------------------


class _Supervisor:
    """Starts, restarts and replaces the workers, and routes events between
    them and the connection queue.

    One selector loop owns everything: the listener (through the queue),
    each child's channel, and a socketpair that signal.set_wakeup_fd() writes
    signal numbers to.  Timeouts are deadlines the loop computes its
    select() timeout from.
    """

    def __init__(self, listeners: List[socket.socket], command: List[str], *, cwd: str,
                 ready_timeout: float, drain_timeout: Optional[float],
                 stop_timeout: float, wakeup: socket.socket, handoff: str = "forward",
                 hang_timeout: Optional[float] = None,
                 on_event: Callable[[str, str], None] = lambda event, detail: None,
                 on_reopen: Callable[[], None] = lambda: None,
                 backlog: int = _DEFAULT_BACKLOG, workers: int = 1,
                 envdir: Optional[str] = None,
                 on_state: Callable[[dict], None] = lambda snapshot: None,
                 output: Optional[str] = None, ready_delay: Optional[float] = None,
                 stop_signal: int = signal.SIGTERM, script: Optional[str] = None,
                 on_upgrade: Optional[Callable[[dict], str]] = None,
                 restore: Optional[dict] = None, steering: Optional[_Steering] = None,
                 quiet_period: float = _DEFAULT_QUIET, probation: float = 0.0,
                 child_nofile: Optional[int] = None,
                 upgraded_from: Optional[str] = None) -> None:
        self._script = script       # the socketprotector.py on disk, for an upgrade
        self._on_upgrade = on_upgrade   # hands everything over and execs; or says why not
        self._restore = restore     # the state an upgrade handed us, to take over from
        self._upgraded_from = upgraded_from     # with it: the version that ran before
        # How the last upgrade asked of this process ended (see _upgrade_ended()).
        self.last_upgrade: Optional[dict] = None
        self._upgrade: Optional[dict] = None    # the check under way: pid, pipe, output
        self._exec_due: Optional[str] = None    # the check passed: exec this version next
        self._notify_dir: Optional[str] = None  # activation: where NOTIFY_SOCKETs are ("": none)
        self._on_reopen = on_reopen
        self._on_state = on_state
        self._published: Optional[dict] = None
        self._published_counts: Optional[dict] = None
        self._publish_due = False   # the counts changed: SIGALRM will publish them
        self._output = output   # where a detached child's output goes, for a failed start
        self._envdir = envdir
        self._forwarding = handoff == "forward"     # else children accept from our listener
        self._activation = handoff == "activation"  # children get it as systemd passes it
        self._ready_delay = ready_delay
        self._stop_signal = stop_signal
        self._command = command
        self._cwd = cwd
        self._ready_timeout = ready_timeout
        self._drain_timeout = drain_timeout
        self._stop_timeout = stop_timeout
        self._hang_timeout = hang_timeout
        self._on_event = on_event
        self._workers = workers                  # the size of every new generation
        self._sel = _Poller()
        self._sel.register(wakeup, _IN, self._on_wakeup)
        self._wakeup = wakeup
        self._queue = _ConnectionQueue(self._sel, listeners, forwarding=self._forwarding,
                                       backlog=backlog,
                                       hang_timeout=hang_timeout if self._forwarding else None,
                                       hung_up=self._channel_closed, own_pids=self._own_pids)
        self._children: dict = {}                # pid -> _Child, until reaped
        # Processes a child left behind holding a listening socket, being
        # stopped: pid -> [pidfd (-1: none), when to SIGKILL it, killed], until gone.
        self._strays: dict = {}
        self._listener_inodes = {_inode(sock) for sock in listeners}
        self._steering = steering       # activation, listener: each generation its own sockets
        # --hang-timeout where the servers accept for themselves.
        self._queue_watch = (_QueueWatch(listeners) if hang_timeout is not None
                             and not self._forwarding else None)
        if self._queue_watch is not None:
            if not self._queue_watch.ends:
                _log.warning("--hang-timeout: only TCP accept queues can be watched; unix: "
                             "addresses are not")
            self._queue_watch.look_at = time.monotonic()
        self._child_nofile = child_nofile   # the soft RLIMIT_NOFILE the children get back
        self._quiet = quiet_period
        self._probation = probation
        # On probation: the generation that served before, kept ready (its
        # servers never told to stop) to serve again if a new worker dies.
        self._fallback: Optional[_Generation] = None
        self._serving: Optional[_Generation] = None
        self._starting: Optional[_Generation] = None    # begun, not yet complete
        self._generation_count = 0
        self._ever_ready = False
        self._restart_again = False
        self._restart_open = False      # a restart began, its outcome not yet reported
        self._stopping = False
        self._stop_deadline: Optional[float] = None
        self._next_deadline: Optional[float] = None   # the soonest, as of the last _timeout()
        self._error: Optional[str] = None
        self.restarts = 0
        self.failed_restarts = 0
        self.crashes = 0
        # --hang-timeout, listener and activation modes: hung generations
        # replaced, replacements that failed, and after one failed, not
        # before when the next starts, and how many failed in a row.
        self.hangs_replaced = 0
        self.failed_replacements = 0
        self._replace_after = 0.0
        self._replace_failures = 0
        # What systemd meant for the daemon is not for the children.
        self._child_env = {k: v for k, v in os.environ.items() if k not in _DAEMON_ONLY_ENV}
        self._child_env[ENV_HANDOFF] = handoff

    def _own_pids(self) -> set:
        """Every process this daemon started and has not reaped."""
        pids = set(self._children)
        if self._upgrade is not None:
            pids.add(self._upgrade["pid"])
        if self._steering is not None and self._steering.helper is not None:
            pids.add(self._steering.helper.pid)     # holds a socket it makes, for an instant
        return pids

    @property
    def forwarded(self) -> int:
        return self._queue.forwarded

    # -- the loop -----------------------------------------------------------

    def run(self) -> None:
        """Serve until shut down; raise SocketProtectorError if start-up failed."""
        try:
            if self._restore is not None:
                self._restore_state(self._restore)
            else:
                self._start_generation()
            poll, handlers = self._sel.poll, self._sel.handlers
            queue, wakeup = self._queue, self._wakeup.fileno()
            listeners = queue.by_fd
            self._pump()            # after an upgrade nothing else may wake us to start
            self._publish()
            timeout = self._timeout()
            while (self._children or self._strays or self._upgrade is not None
                   or not self._stopping):
                if self._exec_due is not None:
                    # At the top of the loop, the batch that decided it all handled.
                    self._exec_upgrade()    # returns if signals came first, or it failed
                    self._pump()
                    self._publish()
                    timeout = self._timeout()
                    continue
                events = poll(timeout)
                # The common case in one step: only a connection to pass on,
                # to a child taking them, and no deadline due yet.
                if len(events) == 1 and events[0][0] in listeners:
                    now = _monotonic()
                    deadline = self._next_deadline
                    if ((deadline is None or now < deadline)
                            and queue.forward_at_once(listeners[events[0][0]])):
                        if not self._publish_due:   # the counts, within a second
                            self._schedule_publish()
                        timeout = None if deadline is None else deadline - now
                        continue
                if len(events) > 1:
                    # Signals first: after a SIGTERM nothing more is accepted.
                    events.sort(key=lambda event: event[0] != wakeup)
                for fd, mask in events:
                    handler = handlers.get(fd)
                    if handler is not None:     # else unregistered by an earlier one
                        handler(mask)
                if self._next_deadline is not None and time.monotonic() >= self._next_deadline:
                    self._check_deadlines()
                self._pump()
                self._publish()
                timeout = self._timeout()
        finally:
            self._close_everything()
        if self._error:
            raise SocketProtectorError(self._error)

    def _timeout(self) -> Optional[float]:
        """Seconds until the soonest deadline (None: none), noted in _next_deadline."""
        now = time.monotonic()
        pending = self._queue.deadlines(now)
        if self._stop_deadline is not None:
            pending.append(self._stop_deadline)
        if self._upgrade is not None and not self._upgrade["killed"]:
            pending.append(self._upgrade["deadline"])
        if self._serving is not None and self._serving.respawn_at:
            pending += self._serving.respawn_at.values()
        pending += [when for _, when, _ in self._strays.values()]
        pending += [g.look_at for g in self._quieting() if g.look_at is not None]
        if self._queue_watch is not None and self._queue_watch.look_at is not None:
            pending.append(self._queue_watch.look_at)
        if self._serving is not None and self._serving.probation_until is not None:
            pending.append(self._serving.probation_until)
        if self._serving is not None and self._serving.unproven:
            pending.append(self._serving.look_at)
        for child in self._children.values():
            if child.deadline is not None:
                pending.append(child.deadline)
            if child.kill_at is not None:
                pending.append(child.kill_at)
            if child.report_at is not None:
                pending.append(child.report_at)
            if child.assume_ready_at is not None:
                pending.append(child.assume_ready_at)
            if child.look_at is not None:
                pending.append(child.look_at)
        if not pending:
            self._next_deadline = None
            return None
        self._next_deadline = min(pending)
        return max(0.0, self._next_deadline - now)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for pid, stray in list(self._strays.items()):
            fd, when, killed = stray
            if now < when:
                continue
            if fd < 0 and _process_gone(pid):   # no pidfd to say so
                self._stray_gone(pid)
            elif not killed:
                _log.warning("process %d still running %.0f s after SIGTERM; sending SIGKILL",
                             pid, _KILL_GRACE)
                self._signal_stray(pid, signal.SIGKILL)
                stray[1:] = [now + (_KILL_GRACE if fd >= 0 else 0.2), True]
            else:
                stray[1] = now + (_KILL_GRACE if fd >= 0 else 0.2)
        for child in list(self._children.values()):
            if child.kill_at is not None and now >= child.kill_at:
                _log.warning("child %d still running %.0f s after SIGTERM; sending SIGKILL",
                             child.pid, _KILL_GRACE)
                child.kill_at = None
                self._signal(child, signal.SIGKILL)
            if child.report_at is not None and now >= child.report_at:
                child.report_at = now + _DRAIN_REPORT_EVERY
                self._report_draining(child, now)
            if child.look_at is not None and now >= child.look_at:
                self._look_for_waiting(child, now)
            if child.assume_ready_at is not None and now >= child.assume_ready_at:
                child.assume_ready_at = None
                if child.state is _State.STARTING and child.notified:
                    _log.info("%s sent READY=1 and was not seen waiting on its listening socket "
                              "within %g s (one waiting some other way cannot be): taking "
                              "READY=1 alone", self._name(child), _READY_UNSEEN)
                    self._ready(child, "notify")
                elif child.state is _State.STARTING:
                    _log.info("%s has run %g s (--ready-delay): taking it as ready",
                              self._name(child), self._ready_delay)
                    self._ready(child, "delay")
            if child.deadline is not None and now >= child.deadline:
                child.deadline = None
                if (child.channel is None and child.state in _LIVE_ROLES
                        and not self._activation):
                    self._hung_up(child)
                elif child.state is _State.STARTING:
                    self._not_ready_in_time(child)
                elif child.state is _State.SERVING:
                    if self._queue.watch(child, now):
                        self._hung(child)
                elif child.state is _State.RETIRING:
                    _log.warning("child %d still draining after %g s; stopping it",
                                 child.pid, self._drain_timeout)
                    self._terminate(child)
        if (self._serving is not None and self._serving.unproven
                and now >= self._serving.look_at):
            self._look_at_unproven(self._serving, now)
        if (self._serving is not None and self._serving.probation_until is not None
                and now >= self._serving.probation_until):
            self._probation_passed(now)
        for generation in self._quieting():
            if generation.look_at is not None and now >= generation.look_at:
                self._look_at_quieting(generation, now)
        if (self._queue_watch is not None and self._queue_watch.look_at is not None
                and now >= self._queue_watch.look_at):
            self._look_for_hang(now)
        if self._serving is not None:
            for index, when in list(self._serving.respawn_at.items()):
                if now >= when:
                    del self._serving.respawn_at[index]
                    self._respawn(index)
        if self._stop_deadline is not None and now >= self._stop_deadline:
            self._stop_deadline = None
            self._terminate_all(f"after --stop-timeout {self._stop_timeout:g} s")
        if self._upgrade is not None and now >= self._upgrade["deadline"]:
            self._end_check(f"the check of {self._script} did not finish within "
                            f"{_UPGRADE_CHECK_TIMEOUT:g} s")
        self._queue.check_deadlines(now)

    def _pump(self) -> None:
        """Send what waits; at shutdown, retire the serving workers once the
        backlog is all theirs; then decide whether to accept."""
        queue = self._queue
        queue.pump()
        if (self._stopping and self._serving is not None and not queue.waiting
                and not queue.spilled):
            queue.update_listening()        # closes the ports once the backlogs are accepted
            if not queue.listeners:
                for child in self._serving.children():
                    if child.state is _State.SERVING:
                        self._retire(child)
        queue.update_listening()

    def _close_everything(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for generation in {id(g): g for g in [*(c.generation for c in self._children.values()),
                                              self._serving, self._starting]
                           if g is not None}.values():
            for sock in generation.sockets or ():
                sock.close()
            generation.sockets = None
        if self._steering is not None:
            self._steering.close()
        for pid in list(self._strays):
            self._stray_gone(pid)
        self._queue.close([*self._children.values()])
        for child in self._children.values():
            self._close_channel(child)
            self._close_notify(child)
            if child.exec_report is not None:
                os.close(child.exec_report)
                child.exec_report = None
        self._sel.close()
        if self._notify_dir:
            try:
                os.rmdir(self._notify_dir)
            except OSError as e:
                _log.warning("cannot remove %s: %s", self._notify_dir, e.strerror)

    # -- signals ------------------------------------------------------------

    def _on_wakeup(self, mask: int) -> None:
        self._handle_signals(self._drain_wakeup())

    def _drain_wakeup(self) -> bytearray:
        signums = bytearray()
        while True:
            try:
                data = self._wakeup.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            signums += data
        return signums

    def _handle_signals(self, signums) -> None:
        self._reap()
        # Each signal as it came: two SIGTERMs mean "now", even read together.
        # (SIGCHLD only says "reap", done above; signals the kernel merged
        # while pending arrive once.)
        for signum in signums:
            if signum == signal.SIGHUP:
                self._request_restart()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self._request_stop(signal.Signals(signum).name)
            elif signum == signal.SIGUSR1:
                self._on_reopen()
            elif signum == signal.SIGUSR2:
                self._request_upgrade()
            elif signum == signal.SIGTTIN:
                self._add_worker()
            elif signum == signal.SIGTTOU:
                self._remove_worker()
            elif signum == signal.SIGALRM:
                self._counts_due()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self._upgrade is not None and pid == self._upgrade["pid"]:
                self._upgrade_checked(status)
                continue
            if self._steering is not None and self._steering.reaped(pid, status):
                continue
            child = self._children.pop(pid, None)
            if child is not None:
                self._exited(child, status)
                self._stop_leftovers()
                self._release_generation(child.generation)
            elif pid in self._strays:   # an orphan we stopped
                self._stray_gone(pid)

    def _quieting(self) -> List[_Generation]:
        return list({id(c.generation): c.generation for c in self._children.values()
                     if c.state is _State.QUIETING}.values())

    def _stop_leftovers(self) -> None:
        """A child has exited: whatever it started and left behind (now ours,
        as their subreaper) that still holds one of our listening sockets
        would go on accepting for code that is gone, beside its successor
        and even after the daemon's exit (a prefork server's workers, when
        their master dies).  SIGTERM, then SIGKILL after _KILL_GRACE.  In
        forwarding the listeners are never handed out: what a child left
        holding its channel is the connection queue's business."""
        if self._forwarding:
            return
        inodes = self._listener_inodes | (self._steering.inodes() if self._steering else set())
        live = {c.pid for c in self._children.values()}     # each leads its process group
        for pid in _processes_holding(inodes, self._own_pids()):
            try:
                if pid in self._strays or os.getpgid(pid) in live:
                    continue        # a live server's own helper, reparented to us
            except OSError:
                continue            # gone meanwhile
            _log.warning("process %d, left behind by a child that has exited, still holds "
                         "the listening socket; stopping it", pid)
            try:
                fd = os.pidfd_open(pid)     # so that neither a signal nor "gone" can miss
            except (AttributeError, OSError):
                fd = -1
            if fd >= 0:
                self._sel.register(fd, _IN, functools.partial(self._stray_gone, pid))
            self._strays[pid] = [fd, time.monotonic() + _KILL_GRACE, False]
            self._signal_stray(pid, signal.SIGTERM)

    def _signal_stray(self, pid: int, sig: int) -> None:
        fd = self._strays[pid][0]
        try:
            if fd >= 0:
                signal.pidfd_send_signal(fd, sig)
            elif not _process_gone(pid):
                os.kill(pid, sig)
        except OSError:
            pass

    def _stray_gone(self, pid: int, mask: int = 0) -> None:
        """A process left behind has exited (reaped by us or by its parent)."""
        fd, _, _ = self._strays.pop(pid, (-1, 0, 0))
        if fd >= 0:
            self._sel.unregister(fd)
            os.close(fd)
        if self._steering is not None:
            self._steering.recheck()    # what it held may leave its group now

    def snapshot(self) -> dict:
        """What the status says, as data (times: CLOCK_MONOTONIC ns), but for
        the per-connection figures (_counts()).  Made and compared at each
        turn of the loop, so each child is a list: [pid, worker, generation,
        state, started, ready_at, retired_at, ready_by, probation, cwd, the
        inodes of the listening sockets it accepts from, when they are its
        generation's own (steering), else None, share: the part of new
        connections it gets while its generation or the next is unproven
        ("1/16", "15/16"), else None].  The status reader
        (_status_document) gives it its documented form."""
        serving, fallback = self._serving, self._fallback
        on_probation = serving is not None and serving.probation_until is not None
        steering = self._steering is not None
        unproven = serving is not None and serving.unproven
        children = []
        for c in sorted(self._children.values(), key=lambda c: (c.generation.number, c.index)):
            generation = c.generation
            probation = ("on_probation" if on_probation and generation is serving else
                         "fallback" if generation is fallback else None)
            sockets = ([_inode(sock) for sock in self._sockets_of(generation)
                        if sock.fileno() >= 0] if steering else None)
            share = (None if not unproven else f"1/{_SHARE}" if generation is serving else
                     f"{_SHARE - 1}/{_SHARE}" if generation is fallback else None)
            children.append([c.pid, c.index, generation.number, c.state.value, _ns(c.started),
                             _ns(c.ready_at), _ns(c.retired_at), c.ready_by, probation, c.cwd,
                             sockets, share])
        return {
            "listeners": [[listener.address, listener.inode]
                          for listener in self._queue.listeners],
            "workers": self._workers, "ready": len(serving.ready()) if serving else 0,
            "children": children,
            "probation_until": _ns(serving.probation_until) if on_probation else None,
            "forwarded": self.forwarded, "restarts": self.restarts,
            "failed": self.failed_restarts, "crashes": self.crashes,
            "hangs_replaced": self.hangs_replaced,
            "failed_replacements": self.failed_replacements,
            "steering_off": self._steering.off if steering else None}

    def _counts(self) -> Optional[dict]:
        """The per-connection figures, forwarding only: connections accepted
        and waiting in our own queue, and per child (by pid) those sent to
        it and, of them, those it has not yet received.  Read only when the
        state is published, not at each turn of the loop."""
        if not self._forwarding:
            return None
        queue = self._queue
        return {"waiting": len(queue.waiting) + queue.parked(),
                "children": {str(c.pid): [c.sent, queue.unreceived(c)]
                             for c in self._children.values()}}

    def _publish(self, due: bool = False) -> None:
        """Hand the state to on_state: at once when more than the count of
        connections forwarded changed, else at most a second late (``due``:
        that second is over; the fast path schedules it too, see run()).
        The per-connection figures go with it, read then, and are read again
        a second later while connections wait that no child has received:
        the state file is never rewritten per connection."""
        snapshot, old = self.snapshot(), self._published
        if not due and snapshot == old:
            return
        if due or old is None or dict(snapshot, forwarded=old["forwarded"]) != old:
            counts = self._counts()
            if (snapshot, counts) != (old, self._published_counts):
                self._published, self._published_counts = snapshot, counts
                self._on_state(snapshot if counts is None else dict(snapshot, counts=counts))
            if counts and not self._publish_due and (
                    counts["waiting"] or any(left for _, left in counts["children"].values())):
                self._schedule_publish()
        elif not self._publish_due:
            self._schedule_publish()

    def _schedule_publish(self) -> None:
        """The counts changed: publish them within _PUBLISH_EVERY.  The time
        is kept by an interval timer (SIGALRM, read from the wakeup socket
        like any signal) rather than a poll() timeout: under steady traffic
        the counts always change, and a timeout on every wait cost 2.7 us
        of the daemon's CPU per connection here (the kernel arms and cancels
        a timer each time), against one setitimer() a second."""
        self._publish_due = True
        signal.setitimer(signal.ITIMER_REAL, _PUBLISH_EVERY)

    def _counts_due(self) -> None:
        """SIGALRM: the second since the counts changed is over."""
        if self._publish_due:
            self._publish_due = False
            self._publish(due=True)

    # -- naming -------------------------------------------------------------

    def _name(self, child: _Child) -> str:
        return f"child {child.pid}" + (f" (worker {child.index})" if self._workers > 1 else "")

    @staticmethod
    def _describe(children: List[_Child]) -> str:
        if len(children) == 1:
            return f"child {children[0].pid}"
        return "children " + ", ".join(str(c.pid) for c in children) if children else "no child"

    def _serving_detail(self) -> str:
        ready = self._serving.ready() if self._serving is not None else []
        if self._workers == 1 and len(ready) == 1:
            return f"child {ready[0].pid} serving"
        return f"{len(ready)}/{self._workers} workers serving"

    # -- generations --------------------------------------------------------

    def _start_generation(self, share: Optional[_Generation] = None) -> None:
        """A new generation of workers, all starting: the restart's, or the
        first; or a hung one's replacement, on copies of its sockets (share)."""
        self._generation_count += 1
        generation = _Generation(self._generation_count, self._workers)
        self._starting = generation
        if share is not None:
            try:
                generation.sockets = (None if share.sockets is None else
                                      [sock.dup() for sock in share.sockets])
            except OSError as e:
                self._generation_failed(generation, None, f"cannot start a replacement: "
                                        f"{e.strerror}")
                return
        elif self._steering is not None and self._serving is not None:
            try:
                generation.sockets = self._steering.open()
                self._prune()       # a retired socket waiting for a newer member may go
            except OSError as e:
                _log.warning("cannot open listening sockets for the new generation (%s): it "
                             "shares the serving one's, which may take connections until "
                             "it stops", e.strerror)
                if self._serving.sockets is not None:   # the daemon's may be out of use
                    try:
                        generation.sockets = [sock.dup() for sock in self._serving.sockets]
                    except OSError as e:
                        self._generation_failed(generation, None, f"cannot start: {e.strerror}")
                        return
        try:
            for index in range(len(generation.slots)):
                self._spawn(generation, index)
        except _SpawnError as e:
            self._generation_failed(generation, None, str(e))

    def _spawn(self, generation: _Generation, index: int) -> _Child:
        """Fork and exec the command into a slot: a new child in STARTING."""
        executable = _resolve_command(self._command[0], self._cwd)
        # The release a symbolic link names now: the child starts there, and
        # the log says which, whatever the link names by the time it is read.
        where = os.path.realpath(self._cwd)
        if self._activation:
            return self._spawn_activated(generation, index, executable, where)
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as e:
            raise _SpawnError(f"cannot start {self._command[0]!r}: {e.strerror}") from None
        env = self._environment(index)
        try:
            pid, report_fd = _fork_exec(executable, self._command, where, env,
                                        theirs.fileno(), nofile=self._child_nofile)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        ours.setblocking(False)
        if self._forwarding:
            theirs.setblocking(False)
            # A small queue: a child that stops receiving soon blocks us, and
            # EVENT_WRITE tells us when it has received most of it.
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _CHANNEL_SNDBUF)
        else:
            theirs.close()
            theirs = None
        return self._started(_Child(pid, index, generation, ours, theirs), report_fd, where)

    def _spawn_activated(self, generation: _Generation, index: int, executable: str,
                         where: str) -> _Child:
        """--handoff activation: the child gets our listening sockets as fds 3,
        4, ... with LISTEN_* set as systemd sets them, and a notification
        socket of its own (NOTIFY_SOCKET) on which READY=1 makes it ready."""
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        address = self._notify_address()
        try:
            notify.bind(address)
            if address[0] != "\0":
                os.chmod(address, 0o666)    # whichever user the server becomes
            notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            notify.setblocking(False)
        except OSError as e:
            notify.close()
            raise _SpawnError(f"cannot start {self._command[0]!r}: notification socket: "
                              f"{e.strerror}") from None
        listeners = self._sockets_of(generation)
        env = self._environment(index)
        env.update(LISTEN_FDS=str(len(listeners)),
                   LISTEN_FDNAMES=":".join(["socketprotector"] * len(listeners)),
                   NOTIFY_SOCKET="@" + address[1:] if address[0] == "\0" else address)
        try:
            pid, report_fd = _fork_exec(executable, self._command, where, env, None,
                                        [sock.fileno() for sock in listeners],
                                        nofile=self._child_nofile)
        except BaseException:
            notify.close()
            raise
        child = _Child(pid, index, generation, None, None)
        child.notify = notify
        if self._ready_delay is not None:
            child.assume_ready_at = child.started + self._ready_delay
        child.look_at = child.started + _READY_LOOK
        return self._started(child, report_fd, where)

    def _notify_address(self) -> str:
        """Where a new child's NOTIFY_SOCKET is bound: a path in a directory of
        our own, which nobody can list (mode 0711: a server that changes user,
        as gosu or setpriv do, still reaches its socket), made anew if it has
        been removed (a cleaner of /tmp).  The kernel tells us who sent each
        notification; see _trusted().  Where no directory can be made, an
        abstract name."""
        if self._notify_dir and not os.path.isdir(self._notify_dir):
            self._notify_dir = None
        if self._notify_dir is None:
            import tempfile     # here: only activation mode needs it (and random, hashlib...)
            try:
                self._notify_dir = tempfile.mkdtemp(prefix="socketprotector-")
                os.chmod(self._notify_dir, 0o711)
            except OSError as e:
                self._notify_dir = ""
                _log.warning("cannot make a directory for the children's notification "
                             "sockets (%s); using abstract names: a READY=1 from a helper "
                             "that has exited before it is read is ignored", e.strerror)
        name = os.urandom(8).hex()
        if self._notify_dir and len(os.fsencode(self._notify_dir)) + 18 < 108:
            return os.path.join(self._notify_dir, name)
        return f"\0socketprotector/{os.getpid()}/{name}"

    def _environment(self, index: int) -> dict:
        """A new child's environment: ours (less the daemon's own), --envdir, its slot."""
        env = dict(self._child_env)
        if self._envdir:
            for name, value in _read_envdir(self._envdir).items():
                if value is None:
                    env.pop(name, None)
                else:
                    env[name] = value
        env[ENV_WORKER] = str(index)
        env["PWD"] = self._cwd
        return env

    def _started(self, child: _Child, report_fd: int, where: str) -> _Child:
        """A child just forked (in the directory ``where``): in its slot, with
        its ready deadline, its exec report read."""
        child.deadline = child.started + self._ready_timeout
        child.cwd = os.path.realpath(self._cwd)     # a release symlink, as it is now
        self._children[child.pid] = child
        child.generation.slots[child.index] = child
        # Whether exec worked is read from the loop: waiting for it here would
        # stop accepting for milliseconds at every restart.
        child.exec_report = report_fd
        self._register_child(child)
        _log.info("%s started in %s: %s", self._name(child),
                  self._cwd if where == self._cwd else f"{self._cwd} ({where})",
                  " ".join(self._command))
        return child

    def _ready(self, child: _Child, how: str) -> None:
        """STARTING -> READY, or SERVING if its generation already serves;
        the generation's last ready child makes it the serving one.  ``how``
        it was judged ready, for the status (see _Child.ready_by)."""
        if child.state is not _State.STARTING:
            return      # retired or stopped before it got here
        child.ready_by = how
        child.ready_at = time.monotonic()
        child.deadline = child.look_at = child.assume_ready_at = None
        generation = child.generation
        if generation.serving:      # a replacement
            self._serve(child)
            _log.info("%s ready, serving", self._name(child))
            self._on_event("recovered", self._serving_detail())
            return
        child.state = _State.READY
        if generation.complete():
            self._promote(generation)
        else:
            ready = sum(1 for c in generation.slots if c is not None and c.state is _State.READY)
            _log.info("%s ready; %d of %d workers ready", self._name(child), ready,
                      len(generation.slots))

    def _serve(self, child: _Child) -> None:
        """A ready child of the serving generation: it is sent connections."""
        child.state = _State.SERVING
        if not self._forwarding and not self._activation and self._sockets_of(child.generation):
            self._hand_listener(child)
        self._update_takers()

    def _promote(self, generation: _Generation) -> None:
        """Every worker is ready: this generation serves, the previous one retires."""
        old = self._serving
        self._starting = None
        self._serving = generation
        generation.serving = True
        # A hang's replacement; or stalled while the restart started
        # (--hang-timeout): hung now, and given no share of new connections.
        replaced = old is not None and old.hung
        stalled = self._stalled_before(old) if old is not None and not replaced else ""
        # Ready by READY=1 alone, it has not shown that anyone accepts: it
        # gets a share until it does, while the old one (kept for a rollback
        # anyway) serves the rest.
        # (A listener-mode child says it is ready itself: no share.)
        share = (self._activation and self._steering is not None and old is not None
                 and not old.hung and self._probation > 0 and bool(old.ready())
                 and any(c.ready_by == "notify" for c in generation.children()))
        if self._steering is not None:
            try:
                self._steering.steer(generation.sockets, self._sockets_of(old)
                                     if share else None)
            except OSError as e:
                _log.error("cannot steer new connections to the new generation: %s", e.strerror)
            self._prune()
        for child in generation.children():
            self._serve(child)
        new = self._describe(generation.children())
        probation = False
        if replaced:
            self.hangs_replaced += 1
            self._replace_failures = 0
            _log.info("%s ready, serving; stopping %s, hung", new,
                      self._describe(old.children()))
            self._retire_generation(old)
        elif old is not None:
            retiring = old.ready()
            hung = stalled
            if hung:
                _log.warning("%s: hung; stopping %s", hung,
                             "it" if len(old.children()) == 1 else "them")
            self._retire_generation(old)    # before saying so: whoever reads the log may act
            # Kept ready to serve again only where it can be steered back to.
            probation = self._probation > 0 and any(
                c.generation is old and c.state is _State.QUIETING
                for c in self._children.values())
            if probation:
                self._fallback = old
                generation.probation_until = time.monotonic() + self._probation
            else:
                self.restarts += 1
            if hung:
                _log.info("%s ready, serving", new)
            elif retiring:
                _log.info("%s ready; %s retiring%s", new, self._describe(retiring),
                          f" once the new one has served {self._probation:g} s (probation)"
                          if probation else "")
            else:
                _log.info("%s ready, serving", new)
            if share and probation:
                generation.unproven = True
                generation.look_at = time.monotonic()
                generation.backlog_seen = 0
                _log.info("%s ready by READY=1 alone: it gets 1 in %d new connections, %s the "
                          "rest, until it is seen accepting (at the latest when its probation "
                          "ends)", new, _SHARE, self._describe(retiring))
            elif share:
                self._steer_fully(generation)
        else:
            _log.info("%s ready, serving", new)
        detail = self._serving_detail()
        if not self._ever_ready:
            self._on_event("ready", detail)
        elif probation:
            pass            # decided when the probation ends
        elif self._restart_open:
            self._restart_finished(detail)
        else:
            self._on_event("recovered", detail)
        self._ever_ready = True
        if self._restart_again and not probation:
            self._restart_again = False
            self._request_restart()

    def _stalled_before(self, old: _Generation) -> str:
        """--hang-timeout, listener and activation modes: the serving
        generation is replaced by a restart.  Its stall so far (what waits
        for it unaccepted, and since when) goes with it: a quieting one is
        hung once that reaches the hang timeout (_quiet_hung()); one that
        reached it while the restart was starting is hung now (set, and
        said: "")."""
        watch = self._queue_watch
        if watch is None or watch.progress_at is None:
            return ""
        now = time.monotonic()
        old.stalled_since, waiting = watch.progress_at, len(watch.seen)
        watch.reset()       # what waits now is the new generation's
        if now - old.stalled_since < self._hang_timeout:
            return ""
        old.hung = True
        return self._accepted_none(old.children(), waiting) + " while the restart started"

    def _accepted_none(self, children: List[_Child], waiting: int) -> str:
        return (f"{self._describe(children)} accepted none of the "
                f"{_plural(waiting, 'connection')} waiting for "
                f"{'it' if len(children) == 1 else 'them'} for {self._hang_timeout:g} s")

    def _probation_passed(self, now: float) -> None:
        """The new generation served its probation: the old one may retire."""
        generation, old = self._serving, self._fallback
        generation.probation_until = None
        if generation.unproven and generation.stalled_since is not None:
            # Connections wait in its share and none has been seen taken.
            waited = now - generation.stalled_since
            if waited >= _READY_UNSEEN:
                self._roll_back(f"{self._describe(generation.children())} took none of the "
                                f"{_plural(generation.backlog_seen, 'connection')} sent to "
                                f"{'it' if len(generation.children()) == 1 else 'them'} in "
                                f"{waited:.1f} s", hung=True)
                return
            generation.probation_until = generation.stalled_since + _READY_UNSEEN
            return      # decided once they have waited that long
        if generation.unproven:
            self._share_ended(generation, "was not seen accepting before its probation ended "
                              "(nothing waited for it)")
        self._fallback = None
        self.restarts += 1
        if old is not None:
            old.look_at = now
        _log.info("%s passed probation (%g s)", self._describe(generation.children()),
                  self._probation)
        if self._restart_open:
            self._restart_finished(self._serving_detail())
        if self._restart_again:
            self._restart_again = False
            self._request_restart()

    def _roll_back(self, failure: str, hung: bool = False) -> None:
        """A new worker ended on probation: the generation before it serves
        again (new connections go back to its sockets; its servers were
        never told to stop), and the new one is stopped (hung: as a hung
        generation is, _stop_hung(): what waits for it moves at once, and a
        frozen server gets the SIGTERM now, not at the SIGKILL)."""
        new, old = self._serving, self._fallback
        new.probation_until = None
        if new.unproven:
            self._share_ended(new, "is rolled back", steer=False)
        self._fallback = None
        self._serving = old
        old.serving = True
        old.look_at = old.quiet_at = old.quiet_limit = old.stalled_since = None
        new.serving = False
        for child in list(self._children.values()):
            if child.generation is old and child.state is _State.QUIETING:
                old.slots[child.index] = child
                child.state = _State.SERVING
                child.retired_at = 0.0
        if self._steering is not None:
            try:
                self._steering.steer(old.sockets)
            except OSError as e:
                _log.error("cannot steer new connections back: %s", e.strerror)
        if hung:
            self._stop_hung(new)
        else:
            for child in new.children():
                self._terminate(child)
        self._update_takers()
        self.failed_restarts += 1
        failure = (f"restart failed: {failure} on probation; rolled back: "
                   f"{self._describe(old.ready())} "
                   f"{'keeps' if len(old.ready()) == 1 else 'keep'} serving")
        _log.error("%s", failure)
        self._restart_finished(failure)
        for index, child in enumerate(old.slots):
            if child is None:
                self._respawn(index)
        if self._restart_again:
            self._restart_again = False
            self._request_restart()

    def _share_from(self) -> Optional[List[socket.socket]]:
        """Steering: the sockets that get the rest of new connections while
        the serving generation gets a share (None: it gets them all)."""
        if self._serving is None or not self._serving.unproven or self._fallback is None:
            return None
        return self._sockets_of(self._fallback)

    def _look_at_unproven(self, generation: _Generation, now: float) -> None:
        """A generation ready by READY=1 alone shows that it accepts when
        connections seen waiting on its socket are gone (nothing else takes
        them from a socket that still listens), or when it is seen waiting
        on it after all (a server whose workers were still loading)."""
        generation.look_at = now + _QUIET_LOOK
        if self._stopping:
            return
        waiting = sum(_backlog_length(sock) or 0 for sock in generation.sockets or ())
        how = None
        if waiting < generation.backlog_seen:
            how = (f"took {_plural(generation.backlog_seen - waiting, 'connection')} seen "
                   f"waiting on its socket")
        else:
            seen = next(filter(None, map(self._seen_waiting, generation.ready())), None)
            if seen is not None:
                how = f"is seen waiting on its socket ({seen})"
        generation.backlog_seen = waiting
        # Since when what waits for it has waited, none taken (_probation_passed()).
        if not waiting:
            generation.stalled_since = None
        elif generation.stalled_since is None:
            generation.stalled_since = now
        if how is not None:
            self._share_ended(generation, how)

    def _share_ended(self, generation: _Generation, why: str, steer: bool = True) -> None:
        """Its share of new connections ends: it gets them all (steer), or
        none (a rollback steers them back)."""
        generation.unproven = False
        generation.look_at = generation.stalled_since = None
        generation.backlog_seen = 0
        children = generation.children()      # none left: the one that died, rolled back
        if steer:
            self._steer_fully(generation)
            if self._fallback is not None:
                # It got 15 in 16 new connections until now: a backlog that
                # grew meanwhile says nothing of a hang; its clock starts now.
                self._fallback.stalled_since = None
        # Said once done: whoever reads the log may act on it.
        _log.info("%s %s: %s", self._describe(children) if children else "the new generation",
                  why, "every new connection goes to it now" if steer else "its share ends")

    def _steer_fully(self, generation: _Generation) -> None:
        try:
            self._steering.steer(generation.sockets)
        except OSError as e:
            _log.error("cannot steer new connections to the new generation: %s", e.strerror)

    def _retire_generation(self, generation: _Generation) -> None:
        """The serving generation has been replaced.  Steered away from (its
        own sockets get nothing new), it first accepts what waits in its
        backlog and is retired once that has stayed empty for the quiet
        period, so that a request on a connection it has just accepted is
        read before it is asked to stop.  Forwarding with --probation: it is
        sent nothing new, its stream left open (what it was sent it still
        receives), so that it can serve again.  Else it retires at once."""
        generation.serving = False
        generation.respawn_at.clear()
        if generation.hung:     # what waits for it is its successor's: nothing to quiet
            self._stop_hung(generation)
            return
        steered = (self._steering is not None and self._serving is not None
                   and generation.sockets is not self._serving.sockets)
        quiet = steered or (self._forwarding and self._probation > 0
                            and self._serving is not None)
        now = time.monotonic()
        if quiet:
            generation.look_at = now
            generation.quiet_at = now + (self._quiet if steered else 0)
            generation.quiet_limit = now + (max(_QUIET_MAX, self._quiet) if steered else 0)
        for child in generation.children():
            if child.state is _State.STARTING:
                self._terminate(child)      # a replacement nobody needs now
            elif quiet:
                generation.vacate(child)
                child.state = _State.QUIETING
                child.retired_at = now
            else:
                self._retire(child)

    def _look_at_quieting(self, generation: _Generation, now: float) -> None:
        """A generation steered away: retire it once its backlog has stayed
        empty for the quiet period (or at the latest after _QUIET_MAX); stop
        it at once if it is hung (_quiet_hung())."""
        waiting = 0 if self._forwarding else sum(
            _backlog_length(sock) or 0 for sock in self._sockets_of(generation))
        if self._quiet_hung(generation, waiting, now):
            return
        if generation is self._fallback:    # on probation: kept as it is
            generation.look_at = (now + _QUIET_LOOK if self._queue_watch is not None
                                  else self._serving.probation_until)
            return
        if waiting:
            generation.quiet_at = now + self._quiet
        generation.look_at = now + _QUIET_LOOK
        if now < min(generation.quiet_at, generation.quiet_limit):
            return
        if waiting:
            _log.warning("the old generation still has %s waiting after %g s; stopping it",
                         _plural(waiting, "connection"), _QUIET_MAX)
        generation.look_at = generation.quiet_at = generation.quiet_limit = None
        for child in list(self._children.values()):
            if child.generation is generation and child.state is _State.QUIETING:
                self._retire(child)

    def _quiet_hung(self, generation: _Generation, waiting: int, now: float) -> bool:
        """--hang-timeout, listener and activation modes: a generation steered
        away whose backlog (which only it takes from) has not shrunk for
        that long, from when it was still serving on, is hung: stopped at
        once (_stop_hung()), not left to --drain-timeout."""
        if self._queue_watch is None:
            return False
        if not waiting:
            generation.stalled_since = None
        elif generation.stalled_since is None or waiting < generation.backlog_seen:
            generation.stalled_since = now
        generation.backlog_seen = waiting
        if (generation.stalled_since is None
                or now - generation.stalled_since < self._hang_timeout):
            return False
        quieting = [c for c in self._children.values()
                    if c.generation is generation and c.state is _State.QUIETING]
        if generation is self._fallback and self._serving.unproven:
            # It still gets 15 in 16 new connections: a backlog that grows
            # may be a slow server's.  It gets nothing new now, and is hung
            # if what waits for it then sees no accept for as long.
            generation.stalled_since = now
            self._share_ended(self._serving, f"ends its share: the backlog of "
                              f"{self._describe(quieting)} has not shrunk for "
                              f"{self._hang_timeout:g} s")
            return False
        _log.warning("%s: hung; stopping %s", self._accepted_none(quieting, waiting),
                     "it" if len(quieting) == 1 else "them")
        self._stop_hung(generation)
        return True

    def _stop_hung(self, generation: _Generation) -> None:
        """A hung generation that no longer serves: its own sockets leave
        their groups first, so that what waits on them moves to the serving
        generation's where the kernel can (tcp_migrate_req), not to a
        server woken to stop; then each of its processes gets SIGTERM, and
        SIGCONT: frozen, it would get the SIGTERM only at the SIGKILL;
        woken, it finishes what it had accepted."""
        generation.hung = True
        generation.look_at = generation.quiet_at = generation.quiet_limit = None
        if generation is self._fallback:
            if self._serving.unproven:      # it got the rest: the new one gets them all
                self._share_ended(self._serving, "ends its share: the old generation is hung")
            self._fallback = None       # nothing to roll back to
        if self._steering is not None:
            others = {_inode(sock) for g in (self._serving, self._starting, self._fallback)
                      if g is not None and g is not generation
                      for sock in self._sockets_of(g)}
            self._steering.take_out([sock for sock in self._sockets_of(generation)
                                     if _inode(sock) not in others])
        for child in [c for c in self._children.values() if c.generation is generation
                      and c.state in (*_LIVE_ROLES, _State.QUIETING)]:
            self._terminate(child)
            self._signal(child, signal.SIGCONT)

    def _release_generation(self, generation: _Generation) -> None:
        """A generation none of whose processes is left: the daemon lets go of
        its sockets, which leave their groups.  The daemon's own (the first
        generation's) leave theirs too once no live generation uses them."""
        live = {g for g in (self._serving, self._starting, self._fallback) if g is not None}
        live.update(c.generation for c in self._children.values())
        if (self._steering is not None and not self._steering.anchors_idle
                and not any(g.sockets is None for g in live)):
            self._steering.anchors_idle = True
            self._prune()
        if self._steering is None or generation.sockets is None or generation in live:
            return
        sockets, generation.sockets = generation.sockets, None
        # A hung generation's successor holds copies of its sockets: those stay.
        kept = {_inode(sock) for g in (self._serving, self._starting, self._fallback)
                if g is not None and g.sockets is not None for sock in g.sockets}
        for sock in [sock for sock in sockets if _inode(sock) in kept]:
            sockets.remove(sock)
            sock.close()
        self._steering.release(sockets)
        self._prune()

    def _prune(self) -> None:
        """_Steering.prune(), once no child of ours is between fork and exec."""
        if self._steering is not None and (
                self._steering.retired or self._steering.anchors_idle
                and not self._steering.anchors_out) and not any(
                c.exec_report is not None for c in self._children.values()):
            self._steering.prune()

    def _generation_failed(self, generation: _Generation, child: Optional[_Child],
                           why: str, unready: str = "") -> None:
        """A new generation will not serve: stop all of it; the serving one
        keeps serving (or, at start-up, the daemon gives up).

        ``why`` follows the child's name, or stands alone when there is none;
        ``unready`` is why the child was never ready (see _start_hint()).
        """
        what = f"{self._name(child)} {why}" if child is not None else why
        for other in generation.children():
            if other is not child and other.state in _LIVE_ROLES:
                self._terminate(other)
        if self._starting is generation:
            self._starting = None
        if self._stopping:
            _log.info("%s", what)
            return
        if self._serving is None:
            self._fail(what + self._start_hint(unready))
            return
        if self._serving.hung:      # a hang's replacement (restarts wait for it)
            self._replacement_failed(what)
            return
        self.failed_restarts += 1
        ready = self._serving.ready()
        keeps = (f"{self._describe(ready)} {'keeps' if len(ready) == 1 else 'keep'} serving"
                 if ready else "no child serves until the serving generation's workers "
                               "are replaced")
        failure = f"restart failed: {what}; {keeps}"
        _log.error("%s", failure)
        self._restart_finished(failure)
        if self._restart_again:
            self._restart_again = False
            self._request_restart()

    def _replacement_failed(self, what: str) -> None:
        """A hung generation's replacement failed: not a restart.  The hung one
        serves on (and may recover: the check decides again); the next
        replacement waits the hang timeout, doubled after each failure in a
        row up to _BACKOFF_MAX."""
        self._serving.hung = False
        self.failed_replacements += 1
        self._replace_failures += 1
        delay = min(self._hang_timeout * 2 ** (self._replace_failures - 1),
                    max(self._hang_timeout, _BACKOFF_MAX))
        self._replace_after = time.monotonic() + delay
        _log.error("replacing the hung generation failed: %s; the next replacement not before "
                   "%g s", what, delay)
        if self._restart_again:
            self._restart_again = False
            self._request_restart()

    def _start_hint(self, unready: str) -> str:
        """For a first start that failed: what ready means (if the child was
        "late", or "silent": it exited before it, having said nothing on its
        channel, or not been seen waiting on its listening socket), and
        where a detached child's output went.  A server that failed for a
        reason of its own (an import error) is as silent, before it has
        touched either (its output says why): the hint is worded for both."""
        hints = []
        if unready == "late" and self._activation:
            hints.append("with --handoff activation, ready means it sent READY=1 to "
                         "$NOTIFY_SOCKET, or --ready-delay passed")
        elif unready == "late":
            hints.append("ready means the server has called receive_connections() or "
                         "created a ConnectionReceiver; for a server that takes a "
                         "listening socket instead, see --handoff activation")
        elif unready == "silent" and self._activation:
            hints.append("it was never seen waiting on its listening socket: with --handoff "
                         "activation the server must take its sockets from $LISTEN_FDS, fd "
                         "3 on: gunicorn without -b, for -b fd://3 makes it use fd 3 twice "
                         "and fail with EBADF; uvicorn with --fd 3; if it failed for a "
                         "reason of its own instead, its output says which")
        elif unready == "silent":
            hints.append(f"it never used ${ENV_FD}: ready means the server has called "
                         f"receive_connections() or created a ConnectionReceiver, and a "
                         f"server that takes a listening socket instead needs --handoff "
                         f"activation; if it failed for a reason of its own instead, its "
                         f"output says which")
        if self._output:
            hints.append(self._output)
        return f" ({'; '.join(hints)})" if hints else ""

    def _restart_finished(self, outcome: str) -> None:
        """The restart a SIGHUP began has ended (an outcome for --reload and systemd)."""
        if self._restart_open:
            self._restart_open = False
            # What --reload reads with the outcome (children still draining)
            # must not be the state from before it.
            self._publish()
            self._on_event("reloaded", outcome)

    # -- one child's transitions --------------------------------------------

    def _hand_listener(self, child: _Child) -> None:
        """Listener mode: a serving child accepts from its generation's
        listening sockets (with steering, its own; else ours)."""
        try:
            _send_fds(child.channel, _MSG_LISTENER, [sock.fileno() for sock in
                                                     self._sockets_of(child.generation)])
        except OSError as e:
            # A fresh channel has room, so this is a hang-up: the grace
            # period will tell whether it exits.
            _log.warning("cannot hand the listener to child %d: %s", child.pid, e.strerror)
            self._channel_closed(child)

    def _update_takers(self) -> None:
        serving = self._serving
        self._queue.set_takers(
            [c for c in serving.slots if c is not None and c.state is _State.SERVING
             and c.channel is not None] if serving is not None and self._forwarding else [])

    def _let_go(self, child: _Child, drain: bool = False) -> None:
        """No more connections for this child: it leaves its slot and its stream ends."""
        child.generation.vacate(child)
        if child.channel is not None:
            try:
                if drain:
                    child.channel.send(_MSG_DRAIN)
                child.channel.shutdown(socket.SHUT_WR)   # a second time is a no-op
            except OSError:
                pass

    def _retire(self, child: _Child) -> None:
        """A live child -> RETIRING: its stream ends; it finishes and exits."""
        # Listener mode at shutdown, or steered away (quieting): nobody
        # takes over the backlog, so the child accepts it before letting go.
        self._let_go(child, drain=not self._forwarding and (
            self._stopping or child.state is _State.QUIETING))
        if self._activation and child.state is not _State.RETIRING:
            self._signal(child, self._stop_signal)      # it has no stream to end
        child.state = _State.RETIRING
        child.retired_at = now = time.monotonic()
        child.deadline = now + self._drain_timeout if self._drain_timeout is not None else None
        if child.ready_at and not self._stopping:
            child.report_at = now + _DRAIN_REPORT_FIRST
        self._update_takers()

    def _signal(self, child: _Child, sig: int) -> None:
        """The one policy for whom a signal to a child reaches, in every mode
        and for every reason.  A child leads its own process group, and the
        group gets it (a shell wrapper's children too), except an activated
        server's stop signals (--stop-signal, SIGTERM): its main process
        alone, as systemd's KillMode=mixed, since a server with workers of
        its own (gunicorn, nginx) stops them itself, in order.  SIGKILL,
        SIGSTOP and SIGCONT reach the group in every mode.  What a child
        leaves behind holding a listening socket once it has exited is
        stopped too (_stop_leftovers)."""
        child.signal(sig, group=not (self._activation and
                                     sig in (self._stop_signal, signal.SIGTERM)))

    def _terminate(self, child: _Child) -> None:
        """Any live state -> STOPPING: SIGTERM now, SIGKILL after _KILL_GRACE."""
        if child.state is _State.STOPPING:
            return
        self._let_go(child)
        child.state = _State.STOPPING
        child.retired_at = child.retired_at or time.monotonic()
        child.report_at = None
        child.deadline = None
        child.kill_at = time.monotonic() + _KILL_GRACE
        self._signal(child, signal.SIGTERM)
        self._update_takers()

    def _exited(self, child: _Child, status: int) -> None:
        """Any state -> EXITED: what it had not received goes to the others."""
        was = child.state
        how = _describe_status(status)
        # Nothing it said waits unread (a READY sent just before it exited).
        said = any(_unread_bytes(sock) for sock in (child.channel, child.notify)
                   if sock is not None)
        child.state = _State.EXITED
        self._close_channel(child)
        self._close_notify(child)
        self._queue.exited(child)
        self._on_exec_report(child)     # a failed exec has written why: read it now
        named = not child.exec_error
        if child.exec_error:
            _, _, text = child.exec_error.decode(errors="replace").partition(":")
            what = f"cannot run {self._command[0]!r}: {text}"
        else:
            what = {_State.STARTING: f"{how} before it was ready",
                    _State.READY: f"{how} before all workers were ready",
                    _State.SERVING: f"{how} unexpectedly"}.get(was, how)
        silent = (was is _State.STARTING and named and not said
                  and os.waitstatus_to_exitcode(status) >= 0)
        if not self._worker_ended(child, was, what, named=named, status=status,
                                  unready="silent" if silent else ""):
            # Dying of the signal we sent to stop it is how it was asked to end.
            expected = status == 0 or (was is _State.RETIRING and self._activation and
                                       os.waitstatus_to_exitcode(status) == -self._stop_signal)
            _log.log(logging.INFO if expected else logging.WARNING,
                     "%s %s (%s)", self._name(child), how, was.value)

    def _worker_ended(self, child: _Child, was: _State, what: str, *, named: bool = True,
                      status: Optional[int] = None, unready: str = "") -> bool:
        """The one place that decides what follows when a worker ends before
        it was retired: it exited (``status``), was not ready in time
        (``unready``: "late"), lost its channel or hung.  ``what`` says what happened,
        after the child's name (``named``).  False if nothing follows: the
        worker no longer filled its slot (retired, removed, replaced).

        Its slot is vacated first.  In a generation still starting, the
        whole generation fails (the serving one keeps serving).  A serving
        worker's end is a crash.  In the serving generation the slot is
        refilled: at once for a worker that had served (what it had not
        received went to the others already), after a back-off for one that
        never got ready or keeps crashing soon after it does; while shutting
        down, never."""
        generation = child.generation
        if (generation is self._fallback and self._serving is not None
                and self._serving.unproven):
            self._share_ended(self._serving, f"no longer shares new connections with "
                              f"{self._name(child)}, kept for a rollback, which {what}")
        if not generation.vacate(child):
            return False
        self._update_takers()
        failure = f"{self._name(child)} {what}" if named else what
        if generation is self._starting:
            self._generation_failed(generation, child if named else None, what,
                                    unready=unready)
            return True
        if was is _State.SERVING:
            self.crashes += 1
        if self._stopping or generation is not self._serving:
            if was is _State.SERVING:
                _log.warning("%s while shutting down", failure)
            return was is _State.SERVING
        if was is not _State.SERVING:
            _log.error("%s; %s", failure,
                       self._schedule_respawn(generation, child.index, backoff=True))
            return True
        if generation.probation_until is not None and self._fallback is not None:
            self._roll_back(failure)
            return True
        crash_loop = self._crash_loop(child, status)
        plan = self._schedule_respawn(generation, child.index, backoff=crash_loop)
        _log.warning("%s; %s%s", failure, plan,
                     " (it keeps crashing soon after it is ready)" if crash_loop else "")
        self._on_event("status", self._serving_detail())
        return True

    @staticmethod
    def _crash_loop(child: _Child, status: Optional[int]) -> bool:
        """Count a serving worker's death toward its slot's crash loop: only a
        death of its own doing (an exit, or a crash signal) soon after it was
        ready counts; one that served long enough clears the back-off."""
        generation, index = child.generation, child.index
        served = time.monotonic() - child.ready_at
        if served >= _STABLE_AFTER:
            generation.backoff.pop(index, None)
            generation.quick_deaths.pop(index, None)
        code = os.waitstatus_to_exitcode(status) if status is not None else -signal.SIGKILL
        own_doing = code >= 0 or -code in _CRASH_SIGNALS
        if own_doing and served < _QUICK_DEATH:
            generation.quick_deaths[index] = generation.quick_deaths.get(index, 0) + 1
        else:
            generation.quick_deaths[index] = 0
        return generation.quick_deaths[index] >= _CRASH_LOOP

    def _schedule_respawn(self, generation: _Generation, index: int, backoff: bool) -> str:
        """Start the slot's next child now, or after its back-off; what was done."""
        if not backoff:
            self._respawn(index)
            return "starting another now"
        delay = generation.backoff.get(index, _BACKOFF_MIN)
        generation.backoff[index] = min(delay * 2, _BACKOFF_MAX)
        generation.respawn_at[index] = time.monotonic() + delay
        return f"starting another in {delay:g} s"

    def _respawn(self, index: int) -> None:
        """A new child for an empty slot of the serving generation."""
        generation = self._serving
        if (self._stopping or generation is None or index >= len(generation.slots)
                or generation.slots[index] is not None):
            return
        generation.respawn_at.pop(index, None)
        try:
            self._spawn(generation, index)
        except _SpawnError as e:
            _log.error("%s; %s", e, self._schedule_respawn(generation, index, backoff=True))

    def _on_exec_report(self, child: _Child, mask: int = 0) -> None:
        """Read what a failed exec writes (errno:strerror); EOF alone means exec worked."""
        while child.exec_report is not None:
            try:
                chunk = os.read(child.exec_report, 256)
            except BlockingIOError:
                return
            if chunk:
                child.exec_error += chunk
                continue
            self._sel.unregister(child.exec_report)
            os.close(child.exec_report)
            child.exec_report = None
            self._prune()       # what waited for this child's exec
    def _look_for_waiting(self, child: _Child, now: float) -> None:
        """Activation: a starting server is ready once it, or a process it
        started, is seen waiting for connections on its listening socket
        (an epoll watching it, or a thread blocked in accept() on it), after
        its exec (before, it holds our descriptors); READY=1 alone is not
        enough where that can be seen (_notified())."""
        child.look_at = None
        if child.state is not _State.STARTING:
            return
        how = self._seen_waiting(child)
        if how is None:
            child.look_at = now + _READY_LOOK
            return
        _log.info("%s %s waiting for connections on its listening socket (%s): ready",
                  self._name(child), "sent READY=1 and is" if child.notified else "is", how)
        self._ready(child, how.partition("(")[0].partition(",")[0])

    def _sockets_of(self, generation: _Generation) -> List[socket.socket]:
        """The sockets a generation listens on: its own (steering), or the
        daemon's (the first generation, and all where restarts share them)."""
        return generation.sockets or self._queue.sockets()

    def _seen_waiting(self, child: _Child) -> Optional[str]:
        if child.exec_report is not None or child.exec_error:
            return None
        sockets = self._sockets_of(child.generation)
        return _seen_waiting(child.pid, {_inode(sock) for sock in sockets})

    def _notified(self, child: _Child, now: float) -> None:
        """READY=1 from a starting server.  It does not prove anyone accepts:
        gunicorn's arbiter sends it before its workers have imported the
        application.  So it is ready once also seen waiting on its socket,
        or, where that cannot be seen (io_uring, or memory we may not read),
        after _READY_UNSEEN."""
        if child.state is not _State.STARTING or child.notified:
            return
        child.notified = True
        if self._seen_waiting(child) is not None:
            child.look_at = now         # says how, at once
            self._look_for_waiting(child, now)
            return
        _log.info("%s sent READY=1; ready once seen waiting on its listening socket, or in "
                  "%g s", self._name(child), _READY_UNSEEN)
        deadline = now + _READY_UNSEEN
        child.assume_ready_at = min(child.assume_ready_at or deadline, deadline)
        if child.look_at is None:
            child.look_at = now + _READY_LOOK

    def _report_draining(self, child: _Child, now: float) -> None:
        """A retired child still runs: say so, and why (keep-alive clients
        pin the old code: HTTP users want a --drain-timeout)."""
        sockets = _count_sockets(child.pid)
        _log.info("%s retired %.0f s ago and still runs%s; %s", self._name(child),
                  now - child.retired_at,
                  f" with {_plural(sockets, 'socket')} open" if sockets is not None else "",
                  "no --drain-timeout: it may run as long as its clients stay connected"
                  if self._drain_timeout is None else
                  f"stopped at --drain-timeout {self._drain_timeout:g} s")

    def _hung(self, child: _Child) -> None:
        """--hang-timeout: a serving child stopped taking the connections sent
        to it.  Frozen (SIGSTOP), it cannot receive, so its queue can be
        taken back at once, for the others; then it is stopped."""
        _log.warning("%s took no connection for %g s while %d waited for it; stopping it",
                     self._name(child), self._hang_timeout, child.unread)
        self._signal(child, signal.SIGSTOP)
        readers = {child.pid}   # and whatever else holds its channel (a forked server)
        if child.inbox is not None:
            readers.update(_processes_holding({_inode(child.inbox)},
                                              self._own_pids() - {child.pid}))
        if all(_frozen(pid) for pid in readers):
            self._queue.reclaim(child)
        self._worker_ended(child, child.state, "hung")
        self._terminate(child)          # else what it holds comes back when it exits
        self._signal(child, signal.SIGCONT)     # so that it gets the SIGTERM

    def _look_for_hang(self, now: float) -> None:
        """--hang-timeout, listener and activation modes: the serving
        generation has accepted none of the connections waiting for it that
        long (_QueueWatch): it is hung.  A replacement starts on the same
        listening sockets, so that it accepts what waits there; once it is
        ready the hung generation is stopped (_retire_generation).  On
        probation, the generation before it serves again instead."""
        watch = self._queue_watch
        watch.look_at = None if self._stopping else now + max(self._hang_timeout / 4, _QUIET_LOOK)
        generation = self._serving
        if generation is None or self._stopping:
            return
        stalled = watch.stalled(now, self._sockets_of(generation))
        if self._starting is not None:
            # The generation starting replaces it anyway, and the stall so far
            # goes with it: hung by then, it is stopped as the new one
            # serves, else once it is (_stalled_before(), _quiet_hung()).
            # If the new one fails, this check goes on where it was.  (A
            # hang's replacement may accept from the same socket before it
            # is ready: whether a hung one took connections again cannot be
            # told meanwhile.)
            return
        if stalled < self._hang_timeout or now < self._replace_after:
            return
        waiting = len(watch.seen)
        watch.reset()       # a replacement that fails is tried again after as long
        what = self._accepted_none(generation.children(), waiting) + ": hung"
        if generation.probation_until is not None and self._fallback is not None:
            self._roll_back(what, hung=True)
            return
        generation.hung = True
        _log.warning("%s; starting a replacement, which takes them over%s", what,
                     f" (attempt {self._replace_failures + 1})" if self._replace_failures else "")
        self._on_event("status", "replacing a hung server")
        self._start_generation(share=generation)

    def _not_ready_in_time(self, child: _Child) -> None:
        self._worker_ended(child, child.state,
                           f"was not ready within {self._ready_timeout:g} s; stopped it",
                           unready="late")
        self._terminate(child)

    def _fail(self, why: str) -> None:
        _log.error("%s", why)
        self._error = why
        self._on_event("failed", why)
        self._request_stop(None)
        self._terminate_all(None)

    # -- upgrading in place ---------------------------------------------------

    def _request_upgrade(self) -> None:
        """SIGUSR2: replace our own code with the socketprotector.py now on
        disk, in this process.  First a separate process loads the new file
        and checks it can take over (this state, dry-run); only then the
        exec, which keeps every descriptor that matters (see export_state())."""
        if self._upgrade is not None or self._exec_due is not None:
            _log.info("SIGUSR2: an upgrade is under way already")
            return
        self._on_event("upgrading", f"checking {self._script}")
        why = ("shutting down" if self._stopping else
               "the first children are not ready yet" if not self._ever_ready else
               None if self._script and self._on_upgrade else "no file to upgrade to")
        if why is not None:
            self._upgrade_refused(why)
            return
        state, _ = self.export_state()
        try:
            pid, out = _spawn_check(self._script, json.dumps(state).encode())
        except OSError as e:
            self._upgrade_refused(f"cannot run {sys.executable}: {e.strerror}")
            return
        _log.info("upgrade: checking %s (pid %d)", self._script, pid)
        self._upgrade = {"pid": pid, "out": out, "output": b"", "killed": False,
                         "deadline": time.monotonic() + _UPGRADE_CHECK_TIMEOUT}
        self._sel.register(out, _IN, self._read_check)

    def _read_check(self, mask: int = 0) -> None:
        upgrade = self._upgrade
        while upgrade is not None and upgrade["out"] is not None:
            try:
                chunk = os.read(upgrade["out"], 4096)
            except BlockingIOError:
                return
            if chunk:
                upgrade["output"] = (upgrade["output"] + chunk)[-65536:]
                continue
            self._sel.unregister(upgrade["out"])
            os.close(upgrade["out"])
            upgrade["out"] = None

    def _upgrade_checked(self, status: int) -> None:
        """The check process ended: exec the new code, or say why not."""
        self._read_check()
        upgrade, self._upgrade = self._upgrade, None
        if upgrade["out"] is not None:
            self._sel.unregister(upgrade["out"])
            os.close(upgrade["out"])
        if upgrade["killed"]:
            return      # refused already, when it ran out of time
        text = upgrade["output"].decode(errors="replace").strip()
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if os.waitstatus_to_exitcode(status) == 0 and lines and lines[-1].startswith("ok "):
            if self._stopping:
                self._upgrade_refused("shutting down")
            else:
                self._exec_due = lines[-1][3:]      # the loop execs once this batch is done
            return
        where = [m for m in map(re.compile(r'File "(.+)", line (\d+)').search, lines) if m]
        self._upgrade_refused(
            f"{self._script}: {lines[-1]}" + (
                "" if not where else f" (line {where[-1].group(2)})"
                if where[-1].group(1) == self._script else
                f" ({where[-1].group(1)}, line {where[-1].group(2)})")
            if lines else f"{self._script} did not answer the check (is it socketprotector?)"
            if os.waitstatus_to_exitcode(status) == 0 else
            f"{self._script}: the check {_describe_status(status)}")

    def _exec_upgrade(self) -> None:
        """Hand everything over and exec, at the top of the loop.  Signals are
        blocked first (what arrives from then on stays pending through the
        exec, for the new code); any read meanwhile are handled here, and
        the exec waits for the next turn of the loop.  Returns if it did
        not exec: signals came first, or the exec failed (nothing changed)."""
        version = self._exec_due
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
        signal.setitimer(signal.ITIMER_REAL, 0)     # timers survive exec; the new code publishes
        pending = self._drain_wakeup()
        reason = None
        if not pending:
            self._exec_due = None
            state, fds = self.export_state()
            if _version_key(version) < _version_key(__version__):
                _log.warning("upgrade: socketprotector %s in %s is older than %s, which runs "
                             "now: a downgrade", version, self._script, __version__)
            _log.info("upgrade: socketprotector %s from %s takes over from %s in this process "
                      "(pid %d)", version, self._script, __version__, os.getpid())
            reason = self._on_upgrade(state, fds)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if self._publish_due:
            self._schedule_publish()
        if reason is not None:
            self._upgrade_refused(f"cannot exec {self._script}: {reason}", version)
        self._handle_signals(pending)

    def _end_check(self, reason: str) -> None:
        """Kill the check under way (it is reaped like any child, and the loop
        runs until it is), or drop an exec the check allowed and the loop
        has not yet made; and refuse the upgrade."""
        upgrade = self._upgrade
        if upgrade is not None and not upgrade["killed"]:
            upgrade["killed"] = True
            os.kill(upgrade["pid"], signal.SIGKILL)
            self._upgrade_refused(reason)
        elif self._exec_due is not None:     # checked, and not yet exec'd
            self._exec_due = None
            self._upgrade_refused(reason)

    def _upgrade_refused(self, reason: str, version: Optional[str] = None) -> None:
        """The upgrade asked for will not happen (``version``: what the new
        file said it was, if it got that far)."""
        _log.error("upgrade refused: %s; socketprotector %s keeps running", reason, __version__)
        self._upgrade_ended("refused", f"upgrade refused: {reason}", __version__, version)

    def _upgrade_ended(self, outcome: str, detail: str, old: Optional[str],
                       new: Optional[str]) -> None:
        """Keep how the last upgrade ended in last_upgrade, and tell on_event:
        {"outcome": "upgraded" or "refused", "detail": the line --upgrade
        prints, "script": the file checked and exec'd, "from": the version
        that ran (None: older than this field), "to": the new one (None if
        refused before it was known), "downgrade": "to" older than "from",
        "at": CLOCK_MONOTONIC ns}."""
        self.last_upgrade = {
            "outcome": outcome, "detail": detail, "script": self._script, "from": old,
            "to": new, "downgrade": (new is not None and old is not None
                                     and _version_key(new) < _version_key(old)),
            "at": time.clock_gettime_ns(time.CLOCK_MONOTONIC)}
        self._on_event("upgraded", detail)

    def export_state(self) -> tuple:
        """Everything the new code needs to take over, as JSON-ready data, and
        the descriptors it names (to be kept open across the exec): the
        listeners, each child's channel, inbox and notification socket, the
        connections waiting in our queue.  What crosses is declared once, in
        _CARRIED.  Times are CLOCK_MONOTONIC, which the exec does not change."""
        fds: List[int] = []

        def keep(obj) -> Optional[int]:
            if obj is None:
                return None
            fd = obj if isinstance(obj, int) else obj.fileno()
            fds.append(fd)
            return fd
        queue = self._queue
        children = list({id(c): c for c in [*self._children.values(), *queue.take_back,
                                             *queue.deferred]}.values())
        generations = {c.generation.number: c.generation for c in children}
        for generation in (self._serving, self._starting, self._fallback):
            if generation is not None:
                generations[generation.number] = generation
        state = {"listeners": [keep(sock) for sock in queue.sockets()],
                 **_dump(self, _SUPERVISOR_STATE, keep), **_dump(queue, _QUEUE_STATE, keep),
                 "children": [_dump(c, _CHILD_STATE, keep) for c in children],
                 "generations": [_dump(g, _GENERATION_STATE, keep)
                                 for _, g in sorted(generations.items())],
                 "steering": (_dump(self._steering, _STEERING_STATE, keep)
                              if self._steering is not None else None),
                 "pending_signals": []}      # read by version 1: the exec now carries none
        return state, fds

    def _restore_state(self, state: dict) -> None:
        """Take over what the previous code handed us (export_state()).

        The state is set as it was, not replayed through the methods that
        change it (they depend on the membership being rebuilt); then what
        needs the live process is done anew: selector registrations, and
        the watches on what still holds a dead child's channel."""
        loaded = _load_state(state)
        refs: dict = {"generations": {}, "children": {}}
        for g in loaded["generations"]:
            refs["generations"][g["number"]] = _Generation(g["number"], 0)
        for c in loaded["children"]:
            refs["children"][c["pid"]] = _Child(c["pid"], 0, None, None, None)
        for g in loaded["generations"]:
            _adopt(refs["generations"][g["number"]], g, _GENERATION_STATE, refs)
        for c in loaded["children"]:
            child = refs["children"][c["pid"]]
            _adopt(child, c, _CHILD_STATE, refs)
            self._register_child(child)
            if child.state is not _State.EXITED:
                self._children[child.pid] = child
        _adopt(self, loaded, _SUPERVISOR_STATE, refs)
        queue = self._queue
        _adopt(queue, loaded, _QUEUE_STATE, refs)
        queue.restored()
        if self._steering is not None and loaded["steering"] is not None:
            _adopt(self._steering, loaded["steering"], _STEERING_STATE, refs)
            self._steering.steer(self._serving.sockets if self._serving is not None else None,
                                 self._share_from())
        self._update_takers()
        for child in list(queue.deferred):
            queue.check_holders(child)      # watch anew; taken back if none holds it now
        old = self._upgraded_from
        downgrade = old is not None and _version_key(__version__) < _version_key(old)
        self._upgrade_ended("upgraded", f"upgraded to socketprotector {__version__} from "
                            f"{self._script}" + (f" (a downgrade from {old})" if downgrade
                                                 else ""), old, __version__)
        self._handle_signals(bytes(loaded["pending_signals"]))

    def _register_child(self, child: _Child) -> None:
        """The selector callbacks a child's descriptors need."""
        if child.channel is not None:
            child.on_channel = functools.partial(self._on_channel, child)
            self._sel.register(child.channel, _IN | (_OUT if child.blocked else 0),
                               child.on_channel)
        if child.notify is not None:
            self._sel.register(child.notify, _IN, functools.partial(self._on_notify, child))
        if child.exec_report is not None:
            self._sel.register(child.exec_report, _IN,
                               functools.partial(self._on_exec_report, child))


    # -- operator requests --------------------------------------------------

    def _request_restart(self) -> None:
        if self._stopping:
            _log.info("SIGHUP ignored: shutting down")
            return
        if self._serving is not None and self._serving.probation_until is not None:
            self._restart_again = True
            _log.info("SIGHUP: the new generation is on probation; one more restart will "
                      "follow once it is decided")
            return
        if self._starting is not None:
            self._restart_again = True
            _log.info("SIGHUP: %s still starting; one more restart will follow",
                      self._describe([c for c in self._starting.children()
                                      if c.state is _State.STARTING]
                                     or self._starting.children()))
            return
        if self._serving is not None:
            _log.info("restart: starting %s to replace %s",
                      "a new child" if self._workers == 1 else f"{self._workers} new workers",
                      self._describe(self._serving.children()))
        self._restart_open = True
        self._on_event("reloading", "starting a new child" if self._workers == 1 else
                       f"starting {self._workers} new workers")
        self._start_generation()

    def _add_worker(self) -> None:
        """SIGTTIN: one worker more, now and in every later generation."""
        if self._stopping or self._workers >= _MAX_WORKERS:
            _log.warning("SIGTTIN ignored: %s", "shutting down" if self._stopping else
                         f"already {_MAX_WORKERS} workers, the most")
            return
        self._workers += 1
        _log.info("SIGTTIN: %d workers", self._workers)
        for generation in (self._serving, self._starting):
            if generation is not None:
                generation.slots.append(None)
                index = len(generation.slots) - 1
                if generation is self._serving:
                    self._respawn(index)
                else:
                    try:
                        self._spawn(generation, index)
                    except _SpawnError as e:
                        self._generation_failed(generation, None, str(e))

    def _remove_worker(self) -> None:
        """SIGTTOU: one worker fewer (never below one): the last slot's child retires."""
        if self._stopping or self._workers <= 1:
            _log.warning("SIGTTOU ignored: %s", "shutting down" if self._stopping else
                         "already down to 1 worker")
            return
        self._workers -= 1
        _log.info("SIGTTOU: %d workers", self._workers)
        for generation in (self._serving, self._starting):
            if generation is None:
                continue
            child = generation.slots[-1]
            generation.forget(len(generation.slots) - 1)
            if child is not None:
                if child.state is _State.SERVING:
                    self._retire(child)
                else:
                    self._terminate(child)
            del generation.slots[-1]
        if self._starting is not None and self._starting.complete():
            self._promote(self._starting)

    def _request_stop(self, signame: Optional[str]) -> None:
        if self._stopping:
            if signame:
                _log.info("%s again: stopping children now", signame)
                self._terminate_all(None)
            return
        self._stopping = True
        self._restart_again = False
        if self._serving is not None:
            self._serving.respawn_at.clear()
        if signame:
            _log.info("%s: shutting down", signame)
        self._on_event("stopping", "shutting down")
        # Forwarding: what waits in the backlog is served, not reset (see
        # _pump).  In listener mode each child accepts its backlog at its end.
        self._queue.stop()
        self._stop_deadline = time.monotonic() + self._stop_timeout
        if self._starting is not None:
            for child in self._starting.children():
                if child.state in _LIVE_ROLES:
                    self._retire(child)
            self._starting = None
        self._fallback = None
        if self._serving is not None:
            self._serving.probation_until = None
        for child in list(self._children.values()):
            if child.state is _State.QUIETING:
                self._retire(child)
        self._end_check("shutting down")
        self._pump()

    def _terminate_all(self, why: Optional[str]) -> None:
        live = [c for c in self._children.values() if c.state is not _State.STOPPING]
        if why and live:
            _log.warning("stopping %s %s", self._describe(live), why)
        for child in live:
            self._terminate(child)

    # -- the channel --------------------------------------------------------

    def _on_channel(self, child: _Child, mask: int) -> None:
        if mask & _OUT and child.channel is not None:
            self._queue.unblocked(child)
        if mask & _READABLE:
            self._read_channel(child)

    def _read_channel(self, child: _Child) -> None:
        while child.channel is not None:
            try:
                msg = child.channel.recv(16)
            except BlockingIOError:
                return
            except OSError:
                msg = b""
            if not msg:
                self._channel_closed(child)
            elif msg[:1] == _MSG_READY and len(msg) in (1, 3):
                if len(msg) == 3:
                    child.batch_limit = max(1, min(_MAX_BATCH, int.from_bytes(msg[1:], "big")))
                self._ready(child, "channel")
            elif msg == _MSG_NACK and child.inbox is not None:
                self._queue.nacked(child)
            else:
                self._lose_channel(child, f"sent an invalid message {msg[:16]!r}")

    def _channel_closed(self, child: _Child) -> None:
        # The child shut its end down: it receives no more, so what waits
        # in its queue is ours again.
        self._close_channel(child)
        self._queue.reclaim(child)
        if child.state in _LIVE_ROLES:
            # Usually it has just exited and SIGCHLD is on its way; wait for
            # that, to report how it ended, before calling it a hang-up.
            child.deadline = time.monotonic() + _EXIT_GRACE

    def _hung_up(self, child: _Child) -> None:
        _log.warning("%s closed its channel but is still running", self._name(child))
        self._lost(child, "closed its channel")

    def _lose_channel(self, child: _Child, why: str) -> None:
        """The child broke the protocol: no more connections to it."""
        _log.warning("%s %s; it gets no more connections", self._name(child), why)
        self._close_channel(child)
        self._lost(child, "broke the channel protocol")

    def _lost(self, child: _Child, what: str) -> None:
        """A live child we can no longer talk to: a starting one is stopped
        (a failed start); a serving one retires and is replaced."""
        was = child.state
        if was in (_State.STARTING, _State.READY):
            self._worker_ended(child, was, f"{what} before it was ready")
            self._terminate(child)
        elif was is _State.SERVING:
            self._worker_ended(child, was, what)
            self._retire(child)

    @staticmethod
    def _trusted(child: _Child, sender: Optional[int], uid: Optional[int]) -> bool:
        """Whether a notification comes from the child or a process it started.
        The sender is judged by its ancestry while it runs; one that has
        exited by now (a helper such as systemd-notify) by the user the
        kernel says sent it: root, ours, or the child's own (who could act
        as the child anyway)."""
        if sender is None:
            return False
        if _descends_from(sender, child.pid):
            return True
        return _process_gone(sender) and uid in (0, os.geteuid(), _process_uid(child.pid))

    def _close_notify(self, child: _Child) -> None:
        if child.notify is not None:
            self._sel.unregister(child.notify)
            address = child.notify.getsockname()
            if isinstance(address, str) and address:
                _unlink_quietly(address)
            child.notify.close()
            child.notify = None

    def _on_notify(self, child: _Child, mask: int) -> None:
        """A datagram on the child's NOTIFY_SOCKET (sd_notify(3)): READY=1
        makes it ready.  Only the child and processes it started may say so:
        the kernel tells us who sent it (SO_PASSCRED)."""
        while child.notify is not None:
            try:
                data, ancdata, _, _ = child.notify.recvmsg(4096, _CREDENTIALS_ROOM)
            except (BlockingIOError, InterruptedError):
                return
            sender, uid = _sender(ancdata)
            if not self._trusted(child, sender, uid):
                _log.warning("ignored a notification for %s from process %s, which is not "
                             "it or started by it", self._name(child), sender)
                continue
            for line in data.decode(errors="replace").split("\n"):
                key, _, value = line.partition("=")
                if line == "READY=1":
                    self._notified(child, time.monotonic())
                elif key == "STATUS":
                    _log.info("%s: %s", self._name(child), value)
                elif line == "STOPPING=1":
                    _log.info("%s is stopping", self._name(child))

    def _close_channel(self, child: _Child) -> None:
        if child.channel is None:
            return
        self._sel.unregister(child.channel)
        child.channel.close()
        child.channel = None
        self._update_takers()


def _memfd_holding(name: str, data: bytes) -> int:
    """A close-on-exec memory file holding data, read from its start."""
    fd = os.memfd_create(name)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _spawn_check(script: str, state: bytes) -> tuple:
    """Start ``python3 SCRIPT --upgrade-check VERSION ARGV...`` (ARGV: the
    command line the exec will give the new code) with the state on its
    stdin: (pid, the read end of a pipe with its stdout and stderr)."""
    data = _memfd_holding("socketprotector-state", state)
    out_r = out_w = -1
    try:
        out_r, out_w = os.pipe()
        pid = os.posix_spawn(
            sys.executable, [sys.executable, script, "--upgrade-check", str(_STATE_VERSION),
                             *sys.argv[1:]],
            os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, data, 0),
                                      (os.POSIX_SPAWN_DUP2, out_w, 1),
                                      (os.POSIX_SPAWN_DUP2, out_w, 2)],
            setsigdef=_HANDLED_SIGNALS, setsigmask=())
    except BaseException:
        if out_r >= 0:
            os.close(out_r)
        raise
    finally:
        os.close(data)
        if out_w >= 0:
            os.close(out_w)
    os.set_blocking(out_r, False)
    return pid, out_r


def _upgrade_check(args: List[str]) -> int:
    """--upgrade-check VERSION [ARGV...], run by the daemon on the file it
    would exec: can this code take over from state VERSION (read from
    stdin), with the daemon's command line ARGV (its whole validation, as
    the exec will run it)?  (A daemon older than this gives no ARGV.)"""
    try:
        version = int(args[0])
        if version not in _STATE_VERSIONS:
            print(f"socketprotector {__version__} cannot take over from state version "
                  f"{version} (it reads {', '.join(map(str, _STATE_VERSIONS))})")
            return EXIT_FAILURE
        if len(args) > 1:
            try:
                _parse_args(args[1:])
            except UsageError as e:
                print(f"socketprotector {__version__} refuses the daemon's command line: {e}")
                return EXIT_FAILURE
        _load_state(json.load(sys.stdin))
    except Exception as e:      # any failure is the answer, in one line
        print(f"socketprotector {__version__} cannot read the state: {type(e).__name__}: {e}")
        return EXIT_FAILURE
    print(f"ok {__version__}")
    return EXIT_OK


def _adopt_socket(fd: Optional[int]) -> Optional[socket.socket]:
    """A socket handed over by an upgrade, close-on-exec again."""
    if fd is None:
        return None
    os.set_inheritable(fd, False)
    return socket.socket(fileno=fd)


def _adopt_fd(fd: Optional[int]) -> Optional[int]:
    if fd is not None:
        os.set_inheritable(fd, False)
    return fd


def _exec_self(script: str, state: dict, keep: List[int]) -> str:
    """Exec the script in this process, handing it ``state`` (in a memfd named
    by $SOCKETPROTECTOR_UPGRADE) and the descriptors in ``keep``.  Returns only
    if the exec failed: why, with everything as it was."""
    data = _memfd_holding("socketprotector-upgrade", json.dumps(state).encode())
    try:
        for fd in (*keep, data):
            os.set_inheritable(fd, True)
        env = dict(os.environ, **{ENV_UPGRADE: str(data)})
        try:
            os.execve(sys.executable, [sys.executable, script, *sys.argv[1:]], env)
        except OSError as e:
            return f"{sys.executable}: {e.strerror}"
    finally:
        for fd in keep:
            os.set_inheritable(fd, False)
        os.close(data)
    return "exec returned"      # never reached


def _inherited_state() -> Optional[dict]:
    """The state an upgrade handed over ($SOCKETPROTECTOR_UPGRADE), or None."""
    fd_text = os.environ.pop(ENV_UPGRADE, None)
    if fd_text is None:
        return None
    fd = int(fd_text)
    with open(fd, "rb") as f:
        state = json.load(f)
    if state.get("version") not in _STATE_VERSIONS:
        raise SocketProtectorError(f"upgrade: state version {state.get('version')!r} is not "
                                   f"one this code reads")
    return state


_LIVE_ROLES = (_State.STARTING, _State.READY, _State.SERVING)


_CREDENTIALS_ROOM = socket.CMSG_SPACE(struct.calcsize("3i"))


def _sender(ancdata) -> tuple:
    """The sending process and its user, from SCM_CREDENTIALS (struct ucred:
    pid, uid, gid); (None, None) if absent."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= 12:
            pid, uid, _ = struct.unpack("3i", data[:12])
            return pid, uid
    return None, None


def _process_uid(pid: int) -> Optional[int]:
    """A process's real user id, from /proc; None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _descends_from(pid: int, ancestor: int) -> bool:
    """Whether pid is ancestor or a process it started (through its parents)."""
    for _ in range(64):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        try:
            pid = int(_proc_stat(f"/proc/{pid}/stat")[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def _process_tree(root: int) -> List[int]:
    """root and every process below it."""
    below = _children_map()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += below[pid]
    return tree


def _seen_waiting(root: int, inodes: set) -> Optional[str]:
    """How root, or a process it started, is seen waiting for connections on
    one of the listening sockets ``inodes``: "epoll, pid N" (an epoll
    instance watches it: asyncio, uvicorn, gthread, Node, Go, tokio),
    "accept(), pid N" (a thread blocked in accept on it), "select(), pid N"
    or "poll(), pid N" (a thread blocked in one, for reading it: gunicorn's
    sync workers); None if not seen."""
    for pid in _process_tree(root):
        held, epolls = set(), []
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link == "anon_inode:[eventpoll]":
                    epolls.append(fd)
                elif link.startswith("socket:[") and int(link[8:-1]) in inodes:
                    held.add(int(fd))
        except OSError:
            continue
        if not held:
            continue        # it holds none: it cannot wait on one
        for fd in epolls:
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    watched = re.findall(r"^tfd:.*\bino:([0-9a-f]+)", f.read(), re.M)
            except OSError:
                continue
            if any(int(ino, 16) in inodes for ino in watched):
                return f"epoll, pid {pid}"
        how = _blocked_on(pid, held)
        if how is not None:
            return f"{how}, pid {pid}"
    return None


def _blocked_on(pid: int, held: set) -> Optional[str]:
    """ "accept()", "select()" or "poll()": a thread of pid blocked in that
    system call on one of its descriptors ``held`` (for reading); None if none is."""
    machine = os.uname().machine
    accepts = _ACCEPT_SYSCALLS.get(machine, ())
    selects = _SELECT_SYSCALLS.get(machine, ()) if sys.byteorder == "little" else ()
    polls = _POLL_SYSCALLS.get(machine, ()) if sys.byteorder == "little" else ()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                fields = f.read().split()
            number, args = int(fields[0]), [int(arg, 16) for arg in fields[1:4]]
        except (OSError, ValueError, IndexError):
            continue
        if number in accepts and args[0] in held:
            return "accept()"
        if number in selects and args[1]:
            # readfds: a bitmap of args[0] bits, fd f at byte f // 8 (little-endian words)
            wanted = sorted(fd for fd in held if fd < args[0])
            bits = _read_memory(pid, args[1], (args[0] + 7) // 8) if wanted else b""
            if any(len(bits) > fd // 8 and bits[fd // 8] >> fd % 8 & 1 for fd in wanted):
                return "select()"
        if number in polls and args[0] and 0 < args[1] <= 4096:
            # struct pollfd {int fd; short events; short revents;}
            table = _read_memory(pid, args[0], args[1] * 8)
            for fd, events, _ in struct.iter_unpack("=ihh", table[:len(table) // 8 * 8]):
                if fd in held and events & select.POLLIN:
                    return "poll()"
    return None


def _read_memory(pid: int, address: int, size: int) -> bytes:
    """size bytes of a process's memory at address (b"" if we may not read them)."""
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.pread(fd, size, address)
    except (OSError, OverflowError, ValueError):
        return b""
    finally:
        os.close(fd)


def _count_sockets(pid: int) -> Optional[int]:
    """How many sockets a process has open; None if we may not look."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return None
    return sum(1 for link in links if link.startswith("socket:"))


def _frozen(pid: int, wait: float = 0.05) -> bool:
    """Whether every thread of a process we sent SIGSTOP has stopped (it
    takes effect at once, but not synchronously); False if not within wait."""
    deadline = time.monotonic() + wait
    while True:
        try:
            states = []
            for tid in os.listdir(f"/proc/{pid}/task"):
                states.append(_proc_stat(f"/proc/{pid}/task/{tid}/stat")[0])
        except (OSError, ValueError, IndexError):
            return False
        if states and all(state in (b"T", b"t") for state in states):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)


def _plural(count: int, noun: str) -> str:
    if count == 1:
        return f"1 {noun}"
    return f"{count} {noun}es" if noun.endswith("sh") else f"{count} {noun}s"


def _resolve_command(name: str, cwd: str) -> str:
    """The executable to run, or _SpawnError saying why there is none (the
    working directory first: a child that cannot enter it cannot start)."""
    _check_enterable(cwd)
    if "/" in name:
        path = os.path.join(cwd, name)
        try:
            mode = os.stat(path).st_mode
        except OSError as e:    # missing, or a directory on the way we may not enter
            raise _SpawnError(f"cannot run {name!r}: {e.strerror}") from None
        if stat.S_ISDIR(mode):
            raise _SpawnError(f"cannot run {name!r}: is a directory")
        if not os.access(path, os.X_OK):
            raise _SpawnError(f"cannot run {name!r}: not executable")
        return path
    found = shutil.which(name)
    if found is None:
        raise _SpawnError(f"cannot run {name!r}: command not found")
    return os.path.join(cwd, found)


def _check_enterable(cwd: str) -> None:
    """_SpawnError if this process's user (the children's) cannot enter cwd."""
    try:
        os.stat(cwd)
        if os.access(cwd, os.X_OK):
            return
        why = os.strerror(errno.EACCES)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM):
            raise _SpawnError(f"cannot enter {cwd}: {e.strerror}") from None
        why = e.strerror
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = f"uid {os.geteuid()}"
    raise _SpawnError(f"cannot enter {cwd}: {why} (the working directory is not reachable for "
                      f"user {user}: pass --chdir with a directory that user can enter)")


def _fork_exec(executable: str, argv: List[str], cwd: str, env: dict,
               channel_fd: Optional[int], listen_fds: List[int] = (),
               nofile: Optional[int] = None):
    """Start the command with channel_fd as its channel, or (socket
    activation) with listen_fds as its fds 3, 4, ...; with nofile, its soft
    RLIMIT_NOFILE (the one the daemon was started with, before it raised
    its own): (pid, the read end of a non-blocking close-on-exec pipe: EOF
    once exec succeeds, "errno:strerror" if not)."""
    if channel_fd is not None:
        env[ENV_FD] = str(channel_fd)
    try:
        err_r, err_w = os.pipe()
    except OSError as e:
        raise _SpawnError(f"cannot start {argv[0]!r}: {e.strerror}") from None
    try:
        # Until the child has reset its handlers, a signal sent to it would
        # run ours and be written into the daemon's wakeup socket: keep them
        # pending until then.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
        pid = -1
        try:
            pid = os.fork()
        except OSError as e:
            raise _SpawnError(f"cannot start {argv[0]!r}: fork: {e.strerror}") from None
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if pid == 0:
            _exec_child(executable, argv, env, cwd, channel_fd, err_w, mask, listen_fds, nofile)
        os.close(err_w)
        err_w = -1
        try:
            os.setpgid(pid, pid)    # also here, so a signal cannot beat the child's own call
        except OSError:
            pass                    # it has exec'd already, having done it itself
        os.set_blocking(err_r, False)
        report, err_r = err_r, -1
        return pid, report
    finally:
        if err_r >= 0:
            os.close(err_r)
        if err_w >= 0:
            os.close(err_w)


def _exec_child(executable: str, argv: List[str], env: dict, cwd: str,
                channel_fd: Optional[int], err_w: int, mask, listen_fds: List[int],
                nofile: Optional[int]) -> None:
    """In the forked child: exec the command or report why not; never returns."""
    try:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        signal.set_wakeup_fd(-1)
        for sig in (*_HANDLED_SIGNALS, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)   # Python ignores SIGPIPE; a server expects the default
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)    # what is pending now acts as default
        os.setpgid(0, 0)
        os.chdir(cwd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        if channel_fd is not None:
            os.set_inheritable(channel_fd, True)
        if listen_fds:
            # To fds 3, 4, ... as systemd passes them: first out of the way
            # (close-on-exec copies above the range), then into place.
            top = 3 + len(listen_fds)
            moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for fd in listen_fds]
            if err_w < top:
                err_w = fcntl.fcntl(err_w, fcntl.F_DUPFD_CLOEXEC, top)
            for n, fd in enumerate(moved):
                os.dup2(fd, 3 + n)      # inheritable
            env["LISTEN_PID"] = str(os.getpid())    # known only now, as systemd sets it
        os.execve(executable, argv, env)
    except OSError as e:
        os.write(err_w, f"{e.errno}:{e.strerror}".encode())
    except BaseException:
        os.write(err_w, b"0:unexpected error before exec")
    finally:
        os._exit(127)


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# ---------------------------------------------------------------------------
# Listening addresses
# ---------------------------------------------------------------------------


def _parse_bind(spec: str, port: Optional[int]) -> tuple:
    """A --bind value as ("tcp", host, port) or ("unix", path, None); UsageError if wrong.

    HOST and bare IPv6 addresses take PORT; HOST:PORT and [IPV6]:PORT name
    their own; unix:PATH is a Unix stream socket.
    """
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path:
            raise UsageError("--bind unix: needs a path")
        return "unix", os.path.abspath(path), None
    host, own = spec, None
    if spec.startswith("["):
        host, bracket, rest = spec[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise UsageError(f"--bind {spec}: write an IPv6 address as [ADDR] or [ADDR]:PORT")
        own = rest[1:] if rest else None
    elif spec.count(":") == 1:
        host, own = spec.split(":")
    if own is not None:
        try:
            own_port = int(own, 10)
        except ValueError:
            raise UsageError(f"--bind {spec}: port must be a number, not {own!r}") from None
        if not 0 <= own_port <= 65535:
            raise UsageError(f"--bind {spec}: port must be between 0 and 65535")
        return "tcp", host or None, own_port
    if port is None:
        raise UsageError(f"--bind {spec} names no port: give PORT, or HOST:PORT")
    return "tcp", host or None, port


def _open_listeners(opts: argparse.Namespace, owner: Optional[tuple],
                    made: List[tuple], reuse_port: bool = False) -> List[socket.socket]:
    """Every address to listen on; on any failure, those opened are closed.
    The Unix sockets made are added to ``made``, for _remove_unix_paths()."""
    binds = opts.binds or [("tcp", None, opts.port)]
    listeners: List[socket.socket] = []
    try:
        for kind, where, port in binds:
            if kind == "unix":
                listeners.append(_listen_unix(where, opts.backlog, opts.socket_mode, owner,
                                              made))
            else:
                listeners.append(_listen(where, port, opts.backlog, reuse_port))
    except BaseException:
        for sock in listeners:
            sock.close()
        _remove_unix_paths(made)
        raise
    return listeners


def _listen_unix(path: str, backlog: int, mode: Optional[int], owner: Optional[tuple],
                 made: List[tuple]) -> socket.socket:
    """A listening Unix stream socket at path.  A stale socket file there (no
    server answers) is replaced; a live one, or anything else, is refused.
    With mode, it is created with that mode; with owner (uid, gid), given to it."""
    where = f"unix:{path}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise SocketProtectorError(f"cannot listen on {where}: {e.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketProtectorError(f"cannot listen on {where}: something that is not a "
                                       f"socket is there")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
                live = True
            except (ConnectionRefusedError, FileNotFoundError):
                live = False        # nobody listens: left by a server that died
            except OSError as e:
                raise SocketProtectorError(f"cannot listen on {where}: {e.strerror}") from None
        if live:
            raise SocketProtectorError(f"cannot listen on {where}: a server already listens "
                                       f"there")
        _unlink_quietly(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mask = os.umask(0o777 & ~mode) if mode is not None else None
    try:
        sock.bind(path)
        st = os.lstat(path)
        if owner is not None and os.geteuid() == 0:
            os.chown(path, *owner, follow_symlinks=False)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise SocketProtectorError(f"cannot listen on {where}: {e.strerror}") from None
    finally:
        if mask is not None:
            os.umask(mask)
    made.append((path, st.st_dev, st.st_ino))
    return sock


def _remove_unix_paths(made: List[tuple]) -> None:
    """At exit: the Unix sockets we made lose their paths, if still ours.
    One we may no longer remove (--user, in a directory that user cannot
    write) is named: the next start replaces it, as a stale socket."""
    for path, dev, ino in made:
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            _log.warning("cannot remove unix:%s at exit: %s (the next start replaces it; to "
                         "have it removed, put it in a directory the daemon's user can write)",
                         path, e.strerror)
    made.clear()


# ---------------------------------------------------------------------------
# Pid file and detaching
# ---------------------------------------------------------------------------


def _open_checked(path: str, flags: int, mode: int, what: str, owners=()) -> int:
    """Open a file the daemon keeps (pid, state, log), refusing what a user
    who can write its directory could plant: a symbolic link (O_NOFOLLOW),
    anything but a plain file, a second hard link, or a file owned by
    another user than us (or one of ``owners``).  Checked on the open
    descriptor, so nothing can be swapped in between.  A descriptor, or
    SocketProtectorError."""
    try:
        # O_NONBLOCK: a FIFO planted there must not block the open.
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SocketProtectorError(f"{what} {path} is a symbolic link; refusing to "
                                       f"follow it") from None
        raise SocketProtectorError(f"cannot open {what} {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_nlink > 1:
        problem = f"has {st.st_nlink} hard links"
    elif st.st_uid != os.geteuid() and st.st_uid not in owners:
        problem = f"belongs to uid {st.st_uid}, not to uid {os.geteuid()}"
    else:
        os.set_blocking(fd, True)
        return fd
    os.close(fd)
    raise SocketProtectorError(f"{what} {path} {problem}; refusing to use it")


def _holds_file(pid: int, st: os.stat_result) -> Optional[bool]:
    """Whether process pid has the file ``st`` open; None if we may not look."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    except PermissionError:
        return None
    for fd in fds:
        try:
            there = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def _named_pid(fd: int) -> Optional[int]:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


class _PidFile:
    """A pid file locked (flock) for the daemon's whole life.

    The file is readable by anyone, so anyone can also flock it.  A lock
    counts as a running daemon only if the process the file names holds
    the file open; a lock held by anyone else is squatting, and the file is
    replaced by a new one.
    """

    def __init__(self, path: str, inherited: Optional[int] = None) -> None:
        """inherited: the locked descriptor an upgrade handed over."""
        self.path = path
        self._fd = -1
        if inherited is not None:
            self._fd = _adopt_fd(inherited)     # the lock came with it
            return
        while True:
            fd = _open_checked(path, os.O_RDWR | os.O_CREAT, 0o644, "pid file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fd = self._locked_by_other(fd)
                if fd < 0:
                    continue
            # The file may have been removed by its previous owner between our
            # open and our lock; then the lock protects nothing: try again.
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                self.write(os.getpid())   # at once: a lock with no pid looks like squatting
                return
            os.close(fd)

    def _locked_by_other(self, fd: int) -> int:
        """Another holds the lock: raise if it is a daemon; otherwise replace
        the file with a new one, locked, and return it (-1: look again)."""
        st = os.fstat(fd)
        for _ in range(10):     # a daemon writes its pid just after it locks
            pid = _named_pid(fd)
            if pid is not None:
                break
            time.sleep(0.01)
        genuine = _holds_file(pid, st) if pid is not None else False
        if genuine is not False:
            os.close(fd)
            raise SocketProtectorError(f"already running, pid {pid} "
                                       f"(pid file {self.path} is locked)")
        os.close(fd)
        # Squatted (or a stale lock): a new file in its place; whoever holds
        # the old one keeps a lock on a file nobody uses.
        fresh = f"{self.path}.{os.getpid()}.new"
        new = _open_checked(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644, "pid file")
        try:
            fcntl.flock(new, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(fresh, self.path)
        except OSError as e:
            os.close(new)
            _unlink_quietly(fresh)
            raise SocketProtectorError(f"cannot replace pid file {self.path}: "
                                       f"{e.strerror}") from None
        print(f"socketprotector: warning: pid file {self.path} was locked by a process "
              f"that is not a daemon{f' (the file names {pid})' if pid else ''}; "
              f"replaced it", file=sys.stderr)
        return new

    def write(self, pid: int) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{pid}\n".encode(), 0)

    def export(self) -> dict:
        return {"path": self.path, "fd": self._fd}

    def release(self) -> None:
        if self._fd < 0:
            return
        _remove_owned_file(self.path, self._fd)
        os.close(self._fd)
        self._fd = -1


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class _Launcher:
    """Detaches the daemon and makes the launching process wait for its verdict."""

    def __init__(self, ready_timeout: float) -> None:
        self._report = -1
        self._reported = False
        self._ready_timeout = ready_timeout

    def detach(self) -> None:
        """Return in the detached daemon; the launcher exits from here."""
        read_end, self._report = os.pipe()
        pid = os.fork()
        if pid > 0:
            os.close(self._report)
            print(f"socketprotector: starting; waiting up to {self._ready_timeout:g} s for "
                  f"the first child to be ready", flush=True)
            os.waitpid(pid, 0)
            verdict = _read_all(read_end).decode(errors="replace")
            if verdict.startswith("ready"):
                print(f"socketprotector: started: {verdict.partition(' ')[2].strip()}",
                      flush=True)
                code = EXIT_OK
            else:
                reason = verdict.partition(" ")[2].strip() or "daemon exited before it was ready"
                print(f"socketprotector: {reason}", file=sys.stderr)
                code = EXIT_FAILURE
            sys.stderr.flush()
            os._exit(code)
        os.close(read_end)
        try:
            os.setsid()
            if os.fork() > 0:
                os._exit(0)
        except BaseException:
            os._exit(EXIT_FAILURE)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        os.chdir("/")

    def on_event(self, event: str, detail: str) -> None:
        if event == "ready":
            self._send(f"ready {detail} (daemon pid {os.getpid()})")
            os.close(self._report)      # the launcher returns now
            self._report = -1
        elif event == "failed":
            # The pipe stays open until this process exits, so the launcher
            # returns only after the clean-up (pid file, children) is done.
            self._send(f"error {detail}")

    def _send(self, line: str) -> None:
        if self._report >= 0 and not self._reported:
            self._reported = True       # the first verdict is the one
            try:
                os.write(self._report, f"{line}\n".encode())
            except OSError:
                pass


class _SystemdNotifier:
    """sd_notify(3) over $NOTIFY_SOCKET: READY, RELOADING, STOPPING and STATUS."""

    def __init__(self, address: str) -> None:
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def on_event(self, event: str, detail: str) -> None:
        status = f"STATUS={detail}"
        if event in ("ready", "reloaded"):
            self._send(f"READY=1\n{status}")
        elif event == "reloading":
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}\n{status}")
        elif event == "stopping":
            self._send(f"STOPPING=1\n{status}")
        else:
            self._send(status)

    def _send(self, message: str) -> None:
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError as e:
            _log.warning("cannot notify systemd at %s: %s", self._address.lstrip("\0"),
                         e.strerror)

    def close(self) -> None:
        self._sock.close()


class _StateFile:
    """PIDFILE.state: what --reload, --stop and --status read about the
    running daemon.

    Lines: "restart SEQ START_NS OUTCOME" for each of the last few restarts
    (START_NS: CLOCK_MONOTONIC when the daemon began it; OUTCOME "running"
    until it ended), the same for upgrades, "stopping 0|1", "last DETAIL",
    "daemon JSON" (what does not change: version, hand-off mode, start
    time, steering, and the limits the control commands wait by), "status
    JSON" (the supervisor's snapshot), then "end", which closes a complete
    record.  Rewritten in place through a descriptor opened at start, so it
    still works after --user has dropped the right to create files there.
    Removed on exit.
    """

    def __init__(self, pid_file: str, inherited: Optional[dict] = None) -> None:
        """inherited: what an upgrade handed over (export()), to go on with."""
        self.path = pid_file + ".state"
        self._restarts: collections.deque = collections.deque(maxlen=8)
        self._upgrades: collections.deque = collections.deque(maxlen=8)
        self._seq = 0
        self._stopping = False
        self._last = "starting"
        self._snapshot: dict = {}
        self._daemon: dict = {}
        self._started = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if inherited is not None:
            self._fd = _adopt_fd(inherited["fd"])
            self._restarts.extend(inherited["restarts"])
            self._upgrades.extend(inherited["upgrades"])
            self._seq, self._last = inherited["seq"], inherited["last"]
            self._started = inherited.get("started", self._started)
            return
        self._fd = _open_checked(self.path, os.O_RDWR | os.O_CREAT, 0o644, "state file")
        self._write(self._last)

    def export(self) -> dict:
        return {"path": self.path, "fd": self._fd, "restarts": list(self._restarts),
                "upgrades": list(self._upgrades), "seq": self._seq, "last": self._last,
                "started": self._started}

    def describe(self, daemon: dict) -> None:
        """What does not change while the daemon runs (the "daemon" line)."""
        self._daemon = dict(daemon, version=__version__, started=self._started)
        self._write(self._last)

    def on_state(self, snapshot: dict) -> None:
        self._snapshot = snapshot
        self._write(self._last)

    def on_event(self, event: str, detail: str) -> None:
        if event == "reloading":
            self._seq += 1
            self._restarts.append([self._seq, time.clock_gettime_ns(time.CLOCK_MONOTONIC),
                                   "running"])
        elif event == "reloaded" and self._restarts and self._restarts[-1][2] == "running":
            self._restarts[-1][2] = detail
        elif event == "upgrading":
            self._upgrades.append([self._upgrades[-1][0] + 1 if self._upgrades else 1,
                                   time.clock_gettime_ns(time.CLOCK_MONOTONIC), "running"])
        elif event == "upgraded" and self._upgrades and self._upgrades[-1][2] == "running":
            self._upgrades[-1][2] = detail
        elif event == "stopping":
            self._stopping = True
        self._last = detail
        self._write(detail)

    def _write(self, last: str) -> None:
        lines = [f"restart {seq} {start} {outcome}" for seq, start, outcome in self._restarts]
        lines += [f"upgrade {seq} {start} {outcome}" for seq, start, outcome in self._upgrades]
        lines += [f"stopping {int(self._stopping)}", f"last {last}",
                  f"daemon {json.dumps(self._daemon, separators=(',', ':'))}",
                  f"status {json.dumps(self._snapshot, separators=(',', ':'))}", "end", ""]
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, "\n".join(lines).encode(), 0)
        except OSError as e:
            _log.warning("cannot write %s: %s", self.path, e.strerror)

    def remove(self) -> None:
        _remove_owned_file(self.path, self._fd)
        os.close(self._fd)


def _remove_owned_file(path: str, fd: int) -> None:
    """Unlink a file we own; if the directory forbids it (after --user), empty it."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        _log.warning("cannot remove %s: %s; emptied it instead", path, e.strerror)
        os.ftruncate(fd, 0)


def _read_state(path: str) -> Optional[dict]:
    """A state file's record ({"restarts": [(seq, start_ns, outcome)],
    "upgrades": the same, "stopping": bool, "last": str, "daemon": dict,
    "status": dict}; what an older daemon does not write is empty); None
    while it is being rewritten."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SocketProtectorError(f"no daemon state in {path}") from None
    except OSError as e:
        raise SocketProtectorError(f"cannot read daemon state {path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SocketProtectorError(f"daemon state {path} is not a regular file")
        # One read of the whole file: a record the daemon rewrites meanwhile
        # then lacks its "end" (and is read again), never mixes two.
        text = os.read(fd, os.fstat(fd).st_size + 65536).decode(errors="replace")
    finally:
        os.close(fd)
    record: dict = {"restarts": [], "upgrades": [], "stopping": False, "last": "",
                    "daemon": {}, "status": {}}
    for line in text.split("\n"):
        key, _, value = line.partition(" ")
        if key in ("restart", "upgrade"):
            seq, start, outcome = value.split(" ", 2)
            record[key + "s"].append((int(seq), int(start), outcome))
        elif key == "stopping":
            record["stopping"] = value == "1"
        elif key == "last":
            record["last"] = value
        elif key in ("daemon", "status"):
            try:
                record[key] = json.loads(value)
            except ValueError:
                return None
        elif key == "end":
            return record
    return None


def _running_pid(pid_file: str) -> Optional[int]:
    """The pid of the daemon holding pid_file's lock, or None if none does.

    The pid is trusted only if that process holds the pid file open (anyone
    who can read the file can lock it, or write a pid into a copy).
    """
    try:
        fd = os.open(pid_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SocketProtectorError(f"pid file {pid_file} is a symbolic link; "
                                       f"refusing to follow it") from None
        raise SocketProtectorError(f"cannot open pid file {pid_file}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SocketProtectorError(f"pid file {pid_file} is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _named_pid(fd)
            genuine = _holds_file(pid, st) if pid is not None else False
            # Not allowed to look (a daemon that dropped privileges): trust
            # a file only root or we could have written.
            if genuine or (genuine is None and st.st_uid in (0, os.geteuid())):
                return pid
            try:
                # A daemon exiting lets go of the file, then of the lock, in
                # between our two looks: is it still locked?
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SocketProtectorError(
                    f"pid file {pid_file} is locked, but not by the process it names "
                    f"({pid if pid is not None else 'none'})") from None
        return None     # nobody holds the lock: a stale file
    finally:
        os.close(fd)


def _signal_daemon(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        raise SocketProtectorError(f"daemon {pid} has exited") from None
    except OSError as e:
        raise SocketProtectorError(f"cannot signal daemon {pid}: {e.strerror}") from None


def _control(opts: argparse.Namespace) -> int:
    """--reload / --stop / --status / --upgrade: act on the daemon the pid file names.

    --reload, --stop and --upgrade wait by the daemon's own limits (its
    --ready-timeout, --probation, --stop-timeout, as its state file gives
    them) unless this command line gives its own; they say on stdout what
    they wait for (and how long at most, and why that long), then how it
    ended; a failure goes to stderr (exit 1).
    """
    pid = _running_pid(opts.pid_file)
    if pid is None:
        if opts.stop:
            print("socketprotector: not running", file=sys.stderr)
            return EXIT_OK
        if opts.format == "prometheus":     # a scrape wants a figure: up 0
            sys.stdout.write(_format_prometheus(None, opts.pid_file))
        raise SocketProtectorError(f"not running (no daemon holds {opts.pid_file})")
    path = opts.pid_file + ".state"
    if opts.status:
        record = _read_state_settled(path)
        doc = _status_document(pid, opts.pid_file, record)
        if opts.format == "json":
            print(json.dumps(doc, indent=2))
        elif opts.format == "prometheus":
            sys.stdout.write(_format_prometheus(doc, opts.pid_file))
        else:
            print(f"socketprotector: daemon {pid}: {_format_status(doc)}"
                  if record["status"] else f"socketprotector: daemon {pid}: {record['last']}")
        return EXIT_OK
    if opts.stop:
        try:        # the limits only: a daemon exiting meanwhile is what we want
            limits = _read_state_settled(path)["daemon"].get("limits", {})
        except SocketProtectorError:
            limits = {}
        stop, named = _limit(opts.stop_timeout, limits, "stop_timeout", _DEFAULT_STOP_TIMEOUT,
                             "--stop-timeout")
        grace = 2 * limits.get("kill_grace", _KILL_GRACE)
        wait = stop + grace + _CONTROL_SPARE
        why = (f"{named}, then up to {grace:g} s to kill what is left, {_CONTROL_SPARE:g} s "
               f"to spare")
        _say(f"stopping daemon {pid}; waiting up to {wait:g} s for it and its children "
             f"to exit ({why})")
        _signal_daemon(pid, signal.SIGTERM)
        # It lets go of the pid file just before it exits: wait for both.
        _await(lambda: _running_pid(opts.pid_file) != pid and _process_gone(pid),
               time.monotonic() + wait,
               f"daemon {pid} still running {wait:g} s after SIGTERM ({why})")
        _say(f"stopped daemon {pid}")
        return EXIT_OK
    record = _read_state_settled(path)
    if record["stopping"]:
        raise SocketProtectorError(f"daemon {pid} is shutting down")
    if opts.upgrade:
        return _control_upgrade(pid, path, record)
    wait, why = _reload_wait(opts, record)
    deadline = time.monotonic() + wait
    _say(f"reloading daemon {pid}; waiting up to {wait:g} s for the new children to be ready "
         f"({why})")
    result = _signal_and_await(pid, path, signal.SIGHUP, "restarts", deadline, record,
                               f"daemon {pid}: restart not finished after {wait:g} s ({why})")
    if result == "stopping":
        raise SocketProtectorError(f"daemon {pid} began shutting down before it restarted")
    if result.startswith("restart failed"):
        raise SocketProtectorError(result)
    # A retired child with nothing open exits at once: wait a moment for
    # that before saying that some are still running.
    settle = time.monotonic() + _RELOAD_SETTLE
    while True:
        draining = [c for c in _status_children((_read_state(path) or record)["status"])
                    if c["state"] in _DRAINING]
        if not draining or time.monotonic() > settle:
            break
        time.sleep(0.02)
    if draining:
        # From an older daemon, in its status.
        limit = record["daemon"].get("limits", record["status"]).get("drain_timeout")
        result += (f"; {len(draining)} retired "
                   f"{'child' if len(draining) == 1 else 'children'} still finishing open "
                   f"connections " + (f"(stopped after --drain-timeout {limit:g} s)" if limit
                                      else "(no --drain-timeout: for as long as their "
                                           "clients stay connected)"))
    _say(f"reloaded: {result}")
    return EXIT_OK


def _limit(given: Optional[float], limits: dict, key: str, default: float,
           option: str) -> tuple:
    """One of the limits a control command waits by: (seconds, what it is).
    This command line's own, else the daemon's, else (an older daemon that
    does not say) the default."""
    if given is not None:
        return given, f"{option} {given:g} s as given"
    if limits.get(key) is not None:
        return limits[key], f"its {option} {limits[key]:g} s"
    return default, f"{option} {default:g} s, the default (the daemon does not say its own)"


def _reload_wait(opts: argparse.Namespace, record: dict) -> tuple:
    """How long --reload waits, and why: its restart's --ready-timeout and
    --probation, after what is left of a restart already under way (its
    SIGHUP then makes one more, which begins once that one is decided)."""
    limits = record["daemon"].get("limits", {})
    ready, why = _limit(opts.ready_timeout, limits, "ready_timeout", _DEFAULT_READY_TIMEOUT,
                        "--ready-timeout")
    probation = limits.get("probation") or 0.0
    one = ready + probation
    if probation:
        why += f" and --probation {probation:g} s"
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    running = [start for _, start, outcome in record["restarts"] if outcome == "running"]
    ahead = 0.0
    if running:
        ahead = float(max(0, math.ceil(one - (now - running[-1]) / 1e9)))
        why += f", after up to {ahead:g} s for the restart under way"
    return ahead + one + _CONTROL_SPARE, f"{why}, {_CONTROL_SPARE:g} s to spare"


def _control_upgrade(pid: int, path: str, record: dict) -> int:
    """--upgrade: SIGUSR2, then wait for the outcome of the first upgrade the
    daemon begins after this instant."""
    check = record["daemon"].get("limits", {}).get("upgrade_check_timeout",
                                                   _UPGRADE_CHECK_TIMEOUT)
    wait = check + _CONTROL_SPARE
    why = f"its check of the new code takes {check:g} s at most, {_CONTROL_SPARE:g} s to spare"
    deadline = time.monotonic() + wait
    _say(f"upgrading daemon {pid} in place; waiting up to {wait:g} s for the new code ({why})")
    result = _signal_and_await(pid, path, signal.SIGUSR2, "upgrades", deadline, {},
                               f"daemon {pid}: upgrade not finished after {wait:g} s ({why})")
    if result == "stopping":
        raise SocketProtectorError(f"daemon {pid} began shutting down before it upgraded")
    if result.startswith("upgrade refused"):
        raise SocketProtectorError(result)
    _say(f"{result} (daemon {pid})")
    return EXIT_OK


def _read_state_settled(path: str, deadline: Optional[float] = None) -> dict:
    """The state file's record, asking again while it is being rewritten."""
    return _await(lambda: _read_state(path), deadline or time.monotonic() + _KILL_GRACE,
                  f"cannot read daemon state {path}")


def _say(line: str) -> None:
    print(f"socketprotector: {line}", flush=True)


def _process_gone(pid: int) -> bool:
    """Whether a process (not our child) is gone, or only a zombie awaiting its reaper."""
    try:
        return _proc_stat(f"/proc/{pid}/stat")[0] == b"Z"
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def _signal_and_await(pid: int, path: str, signum: int, kind: str, deadline: float,
                      record: Dict[str, Any], failure: str) -> str:
    """Send signum, then wait for the outcome of the first of the state
    file's `kind` records (restarts, upgrades) the daemon begins after this
    instant: one already under way does not count, and a signal it folds
    into "one more" begins later.  "stopping" if it shuts down first;
    record keeps the last state read."""
    asked = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    _signal_daemon(pid, signum)

    def outcome():
        record.update(_read_state(path) or {})
        for _, start, result in record.get(kind, ()):
            if start >= asked and result != "running":
                return result
        if record.get("stopping"):
            return "stopping"
        if _process_gone(pid):
            raise SocketProtectorError(f"daemon {pid} exited")
        return None
    return _await(outcome, deadline, failure)


def _await(condition: Callable[[], object], deadline: float, failure: str):
    """For the command-line client: poll until condition() is true; its value."""
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SocketProtectorError(failure)
        time.sleep(0.02)


def _passed_by_systemd() -> range:
    """The descriptors systemd passed this process (socket activation: 3, 4,
    ... as many as $LISTEN_FDS says, if $LISTEN_PID is ours); SocketProtectorError
    if $LISTEN_FDS makes no sense."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return range(0)
    count = os.environ.get("LISTEN_FDS", "0")
    if not count.isdigit() or not 1 <= int(count) <= 64:
        raise SocketProtectorError(f"socket activation passed {count!r} sockets; expected 1 "
                                   f"to 64")
    return range(3, 3 + int(count))


def _close_inherited() -> None:
    """A fresh start: close every descriptor the caller left open but stdio
    and what systemd passed.  A deploy tool that waits for the end of the
    output of the command it ran (a CI runner, Ansible, ssh) would wait
    until the daemon exits: the daemon and every child held its pipe.
    Python's own descriptors are close-on-exec, so cannot have come from
    the caller: only inheritable ones are closed."""
    keep = _passed_by_systemd()
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd > 2 and fd not in keep:
            try:
                if os.get_inheritable(fd):
                    os.close(fd)
            except OSError:
                pass        # the directory's own, closed by now


def _activated_listeners() -> List[socket.socket]:
    """The listening sockets systemd passed (socket activation: fds 3, 4, ...),
    or [] if none were passed to this process."""
    fds = _passed_by_systemd()
    for name in _ACTIVATION_ENV:
        os.environ.pop(name, None)
    listeners: List[socket.socket] = []
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise SocketProtectorError(f"socket activation: fd {fd}: {e.strerror}") from None
        listening = (sock.type == socket.SOCK_STREAM
                     and sock.family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)
                     and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        if not listening:
            sock.detach()
            for other in listeners:
                other.detach()
            raise SocketProtectorError(f"socket activation: fd {fd} is not a listening stream "
                                       f"socket")
        os.set_inheritable(fd, False)
        listeners.append(sock)
    return listeners


def _become_subreaper() -> None:
    """Linux: descendants our children orphan are reparented to us and reaped here."""
    if os.getpid() == 1:
        return          # init already reaps every orphan
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as e:
        _log.debug("cannot become a child subreaper: %s", e)


# ---------------------------------------------------------------------------
# --status: the running daemon's status as a line, JSON or Prometheus text
# ---------------------------------------------------------------------------

_STATUS_SCHEMA = "socketprotector-status"   # --status --json: what the document is
_STATUS_VERSION = 2     # its layout (README: "Status as data"): any change raises it
_SNAPSHOT_CHILD = ("pid", "worker", "generation", "state", "started", "ready_at", "retired_at",
                   "ready_by", "probation", "cwd", "sockets", "share")  # _Supervisor.snapshot()
_DRAINING = ("quieting", "retiring", "stopping")
_READY_BY = {"channel": "receive_connections()", "notify": "READY=1",
             "epoll": "seen waiting in epoll", "accept": "seen waiting in accept()",
             "select": "seen waiting in select()", "poll": "seen waiting in poll()",
             "delay": "--ready-delay"}


def _status_children(status: dict) -> List[dict]:
    """The children of a published snapshot as dicts (_SNAPSHOT_CHILD), also
    from a daemon older than this code (its three lists: what they said)."""
    if "children" in status:
        return [dict(zip(_SNAPSHOT_CHILD, row)) for row in status["children"]]
    blank = dict.fromkeys(_SNAPSHOT_CHILD)
    return ([dict(blank, pid=pid, state="serving", ready_at=since)
             for pid, since in status.get("serving", ())]
            + [dict(blank, pid=pid, state="starting") for pid in status.get("starting", ())]
            + [dict(blank, pid=pid, state="retiring", retired_at=since)
               for pid, since in status.get("draining", ())])


def _status_document(pid: int, pid_file: str, record: dict,
                     now_ns: Optional[int] = None) -> dict:
    """--status --json: the running daemon's status as a document of
    _STATUS_VERSION, from its state file's record (README: "Status as
    data"); times become seconds ago, and the backlogs of the listening
    sockets are looked up now.  What the daemon does not know, or an older
    daemon does not say, is None."""
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) if now_ns is None else now_ns
    status, daemon = record["status"], record["daemon"]
    counts = status.get("counts") or {}
    per_child = counts.get("children", {})
    backlogs = _listening_backlogs()

    def ago(since: Optional[int]) -> Optional[float]:
        return None if not since else round(max(0, now - since) / 1e9, 3)

    def queued(inodes) -> Optional[int]:
        waiting = [backlogs.get(inode) for inode in inodes or ()]
        return sum(waiting) if waiting and None not in waiting else None
    children = []
    for c in _status_children(status):
        figures = per_child.get(str(c["pid"]))
        children.append({
            "pid": c["pid"], "worker": c["worker"], "generation": c["generation"],
            "state": c["state"], "ready_by": c["ready_by"], "probation": c["probation"],
            "share": c.get("share"), "cwd": c["cwd"], "uptime_seconds": ago(c["started"]),
            "ready_seconds_ago": ago(c["ready_at"]),
            "retired_seconds_ago": ago(c["retired_at"]),
            "connections_sent": figures[0] if figures else None,
            "connections_queued": figures[1] if figures else queued(c["sockets"])})
    listeners = status.get("listeners") or [
        [address, None] for address in (status.get("listening") or "").split(", ") if address]
    def last(entries: list, failure: str, failed: str, done: str, said: str) -> Optional[dict]:
        """The last restart's or upgrade's outcome, from the state file's record."""
        if not entries:
            return None
        _, start, outcome = entries[-1]
        return {"outcome": outcome if outcome == "running" else
                failed if outcome.startswith(failure) else done,
                said: None if outcome == "running" else outcome,
                "started_seconds_ago": ago(start)}

    last_restart = last(record["restarts"], "restart failed", "failed", "succeeded", "reason")
    last_upgrade = last(record["upgrades"], "upgrade refused", "refused", "upgraded", "detail")
    forwarding = daemon.get("handoff") == "forward"
    return {
        "schema": _STATUS_SCHEMA, "schema_version": _STATUS_VERSION, "pid_file": pid_file,
        "daemon": {"pid": pid, "version": daemon.get("version"),
                   "handoff": daemon.get("handoff"),
                   "uptime_seconds": ago(daemon.get("started"))},
        # Steering lost while running (its socket helper gone) says so in the status.
        "steering": ({"active": False, "fallback_reason": status["steering_off"]}
                     if status.get("steering_off") else daemon.get("steering")),
        "listeners": [{"address": address, "queued": queued([inode] if inode else None)}
                      for address, inode in listeners],
        "workers": {"ready": status.get("ready", len(status.get("serving", ()))),
                    "total": status.get("workers", 0)},
        "children": children,
        "probation_left_seconds": (None if not status.get("probation_until") else
                                   round(max(0, status["probation_until"] - now) / 1e9, 3)),
        "counters": {"restarts_succeeded": status.get("restarts", 0),
                     "restarts_failed": status.get("failed", 0),
                     "crashes": status.get("crashes", 0),
                     "hangs_replaced": status.get("hangs_replaced", 0),
                     "hang_replacements_failed": status.get("failed_replacements", 0),
                     "connections_forwarded": status.get("forwarded") if forwarding else None,
                     "connections_waiting": counts.get("waiting")},
        "limits": daemon.get("limits"),
        "last_restart": last_restart, "last_upgrade": last_upgrade}


def _format_status(doc: dict) -> str:
    """The status line, from the status document."""
    children, counters = doc["children"], doc["counters"]
    activation = doc["daemon"]["handoff"] == "activation"

    def notes(child: dict) -> str:
        said = []
        if activation and child["ready_by"] and child["state"] not in _DRAINING:
            said.append(f"ready: {_READY_BY.get(child['ready_by'], child['ready_by'])}")
        if child["probation"] == "on_probation":
            left = doc["probation_left_seconds"]
            said.append("on probation" + (f", {left:.0f} s left" if left is not None else ""))
        elif child["probation"] == "fallback":
            said.append("kept for a rollback")
        if child["share"]:
            said.append(f"gets {child['share']} of new connections" + (
                " until seen accepting" if child["probation"] == "on_probation" else ""))
        return f" ({'; '.join(said)})" if said else ""

    def listing(states, since: str, key: str) -> str:
        return ", ".join(f"child {c['pid']} {since} {c[key] or 0:.0f} s{notes(c)}"
                         for c in children if c["state"] in states)
    serving = listing(("serving",), "up", "ready_seconds_ago")
    starting = listing(("starting", "ready"), "for", "uptime_seconds")
    draining = listing(_DRAINING, "for", "retired_seconds_ago")
    parts = [f"listening on {', '.join(l['address'] for l in doc['listeners']) or 'nothing'}",
             f"workers {doc['workers']['ready']}/{doc['workers']['total']} ready"]
    steering = doc["steering"]
    if steering is not None:
        parts.append("steering on" if steering["active"] else
                     f"steering off ({steering['fallback_reason'] or 'reason unknown'})")
    parts.append(f"serving {serving}" if serving else "no child serving")
    if starting:
        parts.append(f"starting {starting}")
    if draining:
        parts.append(f"draining {draining}")
    if counters["connections_forwarded"] is not None:
        parts.append(f"{_plural(counters['connections_forwarded'], 'connection')} forwarded")
    parts += [f"{_plural(counters['restarts_succeeded'], 'restart')} succeeded, "
              f"{counters['restarts_failed']} failed", _plural(counters["crashes"], "crash")]
    if counters["hangs_replaced"] or counters["hang_replacements_failed"]:
        parts.append(f"{_plural(counters['hangs_replaced'], 'hung generation')} replaced, "
                     f"{counters['hang_replacements_failed']} failed")
    upgrade = doc["last_upgrade"]
    if upgrade is not None:
        parts.append("upgrading" if upgrade["outcome"] == "running" else
                     f"last upgrade: {upgrade['detail']}")
    return "; ".join(parts)


def _prometheus_label(value) -> str:
    """A label value in the text exposition format: \\, " and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_prometheus(doc: Optional[dict], pid_file: str) -> str:
    """The status document in Prometheus's text exposition format (0.0.4),
    for node_exporter's textfile collector: one family per figure, each
    with its HELP and TYPE lines, every sample labelled with the pid file
    (several daemons on one host).  None: no daemon runs (up 0 alone)."""
    families: List[tuple] = []      # (name, type, help, [(labels, value)])

    def family(name: str, kind: str, text: str, samples) -> None:
        samples = [(labels, value) for labels, value in samples if value is not None]
        if samples:
            families.append((f"socketprotector_{name}", kind, text, samples))
    family("up", "gauge", "Whether a daemon holds the pid file (1) or not (0).",
           [({}, int(doc is not None))])
    if doc is not None:
        daemon, counters = doc["daemon"], doc["counters"]
        family("info", "gauge", "The running daemon: its pid, version and hand-off mode.",
               [({"pid": daemon["pid"], "version": daemon["version"] or "",
                  "handoff": daemon["handoff"] or ""}, 1)])
        family("uptime_seconds", "gauge", "Seconds since the daemon started.",
               [({}, daemon["uptime_seconds"])])
        if doc["steering"] is not None:
            family("steering_active", "gauge", "Activation mode: whether new connections are "
                   "steered to the serving generation's own socket (1), or all generations "
                   "share one (0, and why).",
                   [({"fallback_reason": doc["steering"]["fallback_reason"] or ""},
                     int(doc["steering"]["active"]))])
        family("workers", "gauge", "Workers per generation, as set.",
               [({}, doc["workers"]["total"])])
        family("workers_ready", "gauge", "Workers of the serving generation ready and serving.",
               [({}, doc["workers"]["ready"])])
        family("restarts_total", "counter", "Restarts (SIGHUP, --reload) decided, by outcome.",
               [({"outcome": "succeeded"}, counters["restarts_succeeded"]),
                ({"outcome": "failed"}, counters["restarts_failed"])])
        family("crashes_total", "counter", "Serving workers that died unasked.",
               [({}, counters["crashes"])])
        family("hang_replacements_total", "counter", "--hang-timeout: hung generations' "
               "replacements (not restarts), by outcome.",
               [({"outcome": "succeeded"}, counters["hangs_replaced"]),
                ({"outcome": "failed"}, counters["hang_replacements_failed"])])
        family("connections_forwarded_total", "counter", "Forwarding: connections passed to "
               "children (published at most a second late).",
               [({}, counters["connections_forwarded"])])
        family("connections_waiting", "gauge", "Forwarding: connections accepted by the daemon "
               "and not yet passed to a child.", [({}, counters["connections_waiting"])])
        family("listener_queued", "gauge", "Connections waiting in a listening socket's "
               "backlog, as the kernel counts them now.",
               [({"address": l["address"]}, l["queued"]) for l in doc["listeners"]])
        last = doc["last_restart"]
        if last is not None and last["outcome"] != "running":
            family("last_restart_succeeded", "gauge", "Whether the last restart decided "
                   "succeeded (1) or failed (0).", [({}, int(last["outcome"] == "succeeded"))])
        family("probation_left_seconds", "gauge", "Activation: seconds left until the new "
               "generation's probation ends.", [({}, doc["probation_left_seconds"])])
        children = doc["children"]
        ids = [{"pid": c["pid"], "worker": c["worker"], "generation": c["generation"]}
               for c in children]
        family("child_info", "gauge", "Each child: its state, how it was judged ready, its "
               "probation, its share of new connections and the directory it started in.",
               [(dict(key, state=c["state"], ready_by=c["ready_by"] or "",
                      probation=c["probation"] or "", share=c.get("share") or "",
                      cwd=c["cwd"] or ""), 1)
                for key, c in zip(ids, children)])
        family("child_uptime_seconds", "gauge", "Seconds since each child started.",
               [(key, c["uptime_seconds"]) for key, c in zip(ids, children)])
        family("child_connections_sent_total", "counter", "Forwarding: connections passed to "
               "each child.", [(key, c["connections_sent"]) for key, c in zip(ids, children)])
        family("child_connections_queued", "gauge", "Connections waiting for each child: "
               "passed to it and not yet received (forwarding), or in the backlog of its "
               "generation's own socket (activation with steering).",
               [(key, c["connections_queued"]) for key, c in zip(ids, children)])
    lines = []
    for name, kind, text, samples in families:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            labels = dict(labels, pid_file=pid_file)
            inside = ",".join(f'{key}="{_prometheus_label(v)}"' for key, v in labels.items())
            lines.append(f"{name}{{{inside}}} {value if isinstance(value, int) else repr(value)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as UsageError, which tells the options a
    command line gave from the defaults (parse_given())."""

    def __init__(self, **kwargs) -> None:
        self.option_defaults: Dict[str, Any] = {}  # dest -> default
        self.option_names: Dict[str, str] = {}     # dest -> its name in messages: "--workers"
        super().__init__(**kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.default is not argparse.SUPPRESS:     # not -h, --version
            self.option_defaults[action.dest] = action.default
            self.option_names[action.dest] = (action.option_strings[-1] if action.option_strings
                                              else action.metavar)
        return action

    def error(self, message: str):
        raise UsageError(message)

    def parse_given(self, args: List[str]) -> tuple:
        """(the options, defaults filled in; the dests of those given; the
        arguments not recognized).  Given means on the command line, even
        with its default value."""
        unset = object()
        # argparse leaves what the namespace already holds, where nothing is
        # given; an option whose default is None is given if not None.
        namespace = argparse.Namespace(**{dest: unset for dest, default
                                          in self.option_defaults.items()
                                          if default is not None})
        opts, extras = self.parse_known_args(args, namespace)
        given = set()
        for dest, default in self.option_defaults.items():
            if getattr(opts, dest) is unset:
                setattr(opts, dest, default)
            elif getattr(opts, dest) is not None:
                given.add(dest)
        return opts, given, extras


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {text!r}")
    return value


def _signal(text: str) -> signal.Signals:
    name = text.upper()
    try:
        return signal.Signals(int(name)) if name.isdigit() else signal.Signals[
            name if name.startswith("SIG") else "SIG" + name]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"not a signal: {text!r}") from None


def _file_mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"must be octal permissions such as 660: {text!r}")
    return value


def _worker_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= _MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {_MAX_WORKERS}: "
                                         f"{text!r}")
    return value


def _build_parser() -> _Parser:
    parser = _Parser(
        prog="socketprotector.py", usage=_USAGE, allow_abbrev=False,
        description="Keep TCP PORT listening and hand its connections to COMMAND; "
                    "SIGHUP restarts COMMAND without refusing a connection.",
        epilog="Signals: HUP restarts the child (start-first), TERM/INT shut down "
               "(twice: at once), USR1 reopens --log-file, USR2 upgrades "
               "socketprotector in place, TTIN/TTOU add or remove a worker.  Exit "
               "codes: 0 clean shutdown, 1 runtime failure, 2 bad usage.")
    parser.add_argument("--reload", action="store_true",
                        help="with --pid-file: restart the running daemon's child and wait; "
                             "exit 1 if the new child failed (the old one still serves)")
    parser.add_argument("--stop", action="store_true",
                        help="with --pid-file: stop the running daemon and wait until it is gone")
    parser.add_argument("--status", action="store_true",
                        help="with --pid-file: print the running daemon's status (a line; "
                             "see --format); exit 1 if none runs")
    parser.add_argument("--format", choices=("line", "json", "prometheus"),
                        help="--status as: line (default), json (a versioned document, see "
                             "README), or prometheus (text exposition, for node_exporter's "
                             "textfile collector)")
    parser.add_argument("--json", action="store_const", dest="format", const="json",
                        help="--status as JSON: --format json")
    parser.add_argument("--upgrade", action="store_true",
                        help="with --pid-file: make the running daemon replace its own code "
                             "with the socketprotector.py now on disk, in place; wait and "
                             "exit 0 once the new code runs, 1 with the reason if it refused")
    parser.add_argument("port", metavar="PORT", nargs="?",
                        help="TCP port to listen on (0 picks a free one and logs it)")
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay attached and log to stderr (default: detach)")
    parser.add_argument("--pid-file", metavar="PATH",
                        help="write the daemon's pid here, locked while it runs")
    parser.add_argument("--bind", metavar="ADDR", action="append",
                        help="address to listen on, again for several: HOST (with PORT), "
                             "HOST:PORT, [IPV6]:PORT or unix:PATH (default: every interface, "
                             "IPv6 and IPv4, on PORT)")
    parser.add_argument("--socket-mode", metavar="MODE", type=_file_mode,
                        help="permissions of the Unix sockets --bind makes, in octal "
                             "(default: as the umask allows)")
    parser.add_argument("--backlog", metavar="N", type=_positive_int, default=_DEFAULT_BACKLOG,
                        help=f"listen backlog (default {_DEFAULT_BACKLOG})")
    parser.add_argument("--handoff", choices=("forward", "listener", "activation"),
                        default="forward",
                        help="forward: the daemon accepts and passes each connection to the "
                             "child (default); listener: the serving child is handed the "
                             "listening socket and accepts directly; activation: the child "
                             "gets the listening sockets as systemd passes them (fd 3, "
                             "LISTEN_FDS): for servers not written for socketprotector")
    parser.add_argument("--ready-delay", metavar="S", type=_seconds,
                        help="--handoff activation: a child that has sent no READY=1 and is "
                             "never seen waiting on its listening socket (in epoll, accept(), "
                             "select() or poll()) counts as ready once it has run S seconds "
                             "(a guess)")
    parser.add_argument("--quiet-period", metavar="S", type=_seconds, default=_DEFAULT_QUIET,
                        help="--handoff activation and listener: once the new generation "
                             "serves, the old one gets no new connection, accepts what waits "
                             "for it, and is asked to stop (let go of, in listener mode) once "
                             f"nothing has waited for S seconds (default {_DEFAULT_QUIET:g})")
    parser.add_argument("--probation", metavar="S", type=_non_negative, default=None,
                        help="every hand-off mode: the old generation stays ready "
                             "to serve again for S seconds after the new one serves; a new "
                             "worker that dies meanwhile rolls the restart back (default: "
                             f"{_DEFAULT_PROBATION:g} with --handoff activation, 0 (none) "
                             f"forwarding and in listener mode)")
    parser.add_argument("--stop-signal", metavar="SIG", type=_signal, default=signal.SIGTERM,
                        help="--handoff activation: the signal that asks a retiring child to "
                             "stop gracefully (default SIGTERM; nginx wants SIGQUIT)")
    parser.add_argument("-n", "--workers", metavar="N", type=_worker_count, default=1,
                        help="run N children (workers) at once, each told its index in "
                             f"${ENV_WORKER}; SIGTTIN/SIGTTOU add or remove one (default 1, "
                             f"at most {_MAX_WORKERS})")
    # --ready-timeout and --stop-timeout: None unless given, so that --reload
    # and --stop can tell the operator's own limit from the default, and
    # wait by the daemon's otherwise (_parse_args sets the defaults).
    parser.add_argument("--ready-timeout", metavar="S", type=_seconds,
                        help="a new child not ready after S seconds is stopped and the old "
                             f"one keeps serving (default {_DEFAULT_READY_TIMEOUT:g}; with "
                             "--reload: wait by this instead of the daemon's own)")
    parser.add_argument("--drain-timeout", metavar="S", type=_seconds, default=None,
                        help="a retired child still running after S seconds gets SIGTERM, "
                             "then SIGKILL (default: no limit)")
    parser.add_argument("--hang-timeout", metavar="S", type=_seconds, default=None,
                        help="a server that takes no connection for S seconds while some "
                             "wait for it is replaced and stopped; what it had not taken "
                             "goes to the replacement (forwarding: that child; listener and "
                             "activation: its generation, replaced start-first; default: off)")
    parser.add_argument("--stop-timeout", metavar="S", type=_seconds,
                        help="on shutdown, children still running after S seconds get "
                             f"SIGTERM, then SIGKILL (default {_DEFAULT_STOP_TIMEOUT:g}; "
                             "with --stop: wait by this instead of the daemon's own)")
    parser.add_argument("--chdir", metavar="DIR",
                        help="run the children in DIR (default: where the daemon was started, "
                             "as $PWD names it), resolved again for each new child")
    parser.add_argument("--envdir", metavar="DIR",
                        help="set the children's environment from the files in DIR, read "
                             "again for each new child (as daemontools' envdir)")
    parser.add_argument("--log-file", metavar="PATH",
                        help="log here (detached: the children's output too); SIGUSR1 "
                             "reopens it (default: stderr with -f, else syslog)")
    parser.add_argument("--user", metavar="USER[:GROUP]",
                        help="started as root: bind the port and write the pid file, then "
                             "run the daemon and its children as USER")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--version", action="version", version=f"socketprotector {__version__}")
    return parser


def _parse_args(argv: List[str]) -> argparse.Namespace:
    """Options and PORT before '--', the command after it; UsageError if wrong."""
    parser = _build_parser()
    if "--" in argv:
        split = argv.index("--")
        own, command = argv[:split], argv[split + 1:]
    else:
        own, command = argv, None
    opts, given, extras = parser.parse_given(own)     # -h and --version exit here
    if extras:
        _refuse_unrecognized(extras, command)
    opts.command = command
    if opts.pid_file:
        opts.pid_file = os.path.abspath(opts.pid_file)
    if opts.log_file:
        opts.log_file = os.path.abspath(opts.log_file)
    if opts.envdir:
        # The detached daemon runs in /; a release link is followed at each read.
        opts.envdir = os.path.normpath(os.path.join(_logical_cwd(), opts.envdir))
    actions = [name for name in ("reload", "stop", "status", "upgrade") if getattr(opts, name)]
    if actions:
        if len(actions) > 1:
            raise UsageError(f"--{actions[0]} and --{actions[1]} cannot be combined")
        if not opts.pid_file:
            raise UsageError(f"--{actions[0]} needs --pid-file")
        if opts.port is not None or command is not None:
            raise UsageError(f"--{actions[0]} takes no PORT or command")
        if opts.format is not None and not opts.status:
            raise UsageError(f"--format and --json are for --status, not --{actions[0]}")
        _refuse_idle_control(actions[0], given, parser.option_names)
        return opts
    if opts.format is not None:
        raise UsageError("--format and --json are for --status")
    if opts.ready_timeout is None:
        opts.ready_timeout = _DEFAULT_READY_TIMEOUT
    if opts.stop_timeout is None:
        opts.stop_timeout = _DEFAULT_STOP_TIMEOUT
    if opts.port is not None:
        try:
            opts.port = int(opts.port, 10)
        except ValueError:
            raise UsageError(f"PORT must be a number, not {opts.port!r}") from None
        if not 0 <= opts.port <= 65535:
            raise UsageError(f"PORT must be between 0 and 65535, not {opts.port}")
    opts.binds = [_parse_bind(spec, opts.port) for spec in opts.bind or ()]
    _refuse_idle_options(opts, given, parser.option_names)
    if opts.probation is None:
        # A library server says it is ready itself, once set up: opt in.
        opts.probation = _DEFAULT_PROBATION if opts.handoff == "activation" else 0.0
    if opts.port is None and not opts.binds:
        raise UsageError("the following arguments are required: PORT")
    if command is None:
        raise UsageError("missing '--' between PORT and the command to run")
    if not command:
        raise UsageError("missing the command to run after '--'")
    return opts


# What each control command uses besides --pid-file; every other option
# does nothing there, and is refused.
_CONTROL_USES = {"reload": {"ready_timeout"}, "stop": {"stop_timeout"}, "status": {"format"},
                 "upgrade": set()}
_DAEMON_FLAGS = ("-d", "-D", "--daemon", "--daemonize")   # other tools' "detach"


def _refuse_unrecognized(extras: List[str], command: Optional[List[str]]) -> None:
    """UsageError for arguments argparse did not recognize, saying what was
    probably meant: '--' before the command, or -f (detaching is the default)."""
    detach = [arg for arg in extras if arg in _DAEMON_FLAGS]
    if detach:
        raise UsageError(f"{detach[0]}: socketprotector detaches by default; -f keeps it in "
                         f"the foreground")
    message = f"unrecognized arguments: {' '.join(extras)}"
    if command is None and any(not arg.startswith("-") for arg in extras):
        message += " (put '--' before the command to run: PORT -- COMMAND [ARG...])"
    raise UsageError(message)


def _refuse_idle_control(action: str, given: set, names: Dict[str, str]) -> None:
    """UsageError for an option the control command ``action`` would ignore."""
    idle = sorted(given - {action, "pid_file"} - _CONTROL_USES[action])
    if idle:
        users = [f"--{other}" for other, uses in _CONTROL_USES.items() if idle[0] in uses]
        raise UsageError(f"{names[idle[0]]} does nothing with --{action}: it is for starting "
                         f"the daemon" + "".join(f" and for {user}" for user in users))


def _refuse_idle_options(opts: argparse.Namespace, given: set, names: Dict[str, str]) -> None:
    """UsageError for an option that would do nothing in the daemon this
    command line starts: in another hand-off mode, or without its companion."""
    if opts.handoff != "activation":
        for dest in ("ready_delay", "stop_signal"):
            if dest in given:
                raise UsageError(f"{names[dest]} is for --handoff activation")
    if opts.handoff == "forward" and "quiet_period" in given:
        raise UsageError(f"{names['quiet_period']} is for --handoff activation and listener")
    if opts.handoff != "forward" and given & {"quiet_period", "probation"}:
        why = _why_not_steer(opts, False)
        if why is not None:
            dest = min(given & {"quiet_period", "probation"})
            raise UsageError(f"{names[dest]} does nothing here: restarts share one listening "
                             f"socket ({why})")
    if ("hang_timeout" in given and opts.handoff != "forward" and opts.binds
            and all(kind == "unix" for kind, _, _ in opts.binds)):
        raise UsageError(f"--hang-timeout watches TCP accept queues with --handoff "
                         f"{opts.handoff}, and every address is unix:")
    if "socket_mode" in given and not any(kind == "unix" for kind, _, _ in opts.binds):
        raise UsageError("--socket-mode is for the Unix sockets --bind unix:PATH makes, and "
                         "none is given")
    if opts.port is not None and opts.binds and not any(map(_takes_port, opts.bind)):
        raise UsageError(f"PORT {opts.port} does nothing: every --bind names its own port "
                         f"or is unix:")


def _takes_port(spec: str) -> bool:
    """Whether a --bind value (a valid one) listens on PORT."""
    try:
        _parse_bind(spec, None)
    except UsageError:      # names no port
        return True
    return False


class _LogFile:
    """--log-file: the daemon's log, and when detached its children's output.

    With --user it belongs to that user (mode 0640), so that the daemon can
    create a new one after logrotate has moved it away.
    """

    def __init__(self, path: str, owner: Optional[tuple] = None,
                 inherited: Optional[dict] = None) -> None:
        """inherited: what an upgrade handed over (export()), to go on with."""
        self.path = path
        self._owner = owner         # (uid, gid) it should belong to, or None: ours
        if inherited is None:
            self.stream = self._open()
            self._stdio = False
        else:
            self._owner = tuple(inherited["owner"]) if inherited["owner"] else None
            self.stream = open(_adopt_fd(inherited["fd"]), "a", buffering=1, encoding="utf-8",
                               errors="replace")
            self._stdio = inherited["stdio"]
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(logging.Formatter(
            "%(asctime)s socketprotector[%(process)d]: %(message)s"))

    def export(self) -> dict:
        return {"path": self.path, "fd": self.stream.fileno(), "owner": self._owner,
                "stdio": self._stdio}

    def _open(self):
        owners = (self._owner[0],) if self._owner else ()
        fd = _open_checked(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640,
                           "log file", owners)
        try:
            if self._owner and os.geteuid() != self._owner[0]:
                os.fchown(fd, *self._owner)     # adopt it for the user
                os.fchmod(fd, 0o640)
            return open(fd, "a", buffering=1, encoding="utf-8", errors="replace")
        except OSError as e:
            os.close(fd)
            raise SocketProtectorError(f"cannot open log file {self.path}: "
                                       f"{e.strerror}") from None

    def take_stdio(self) -> None:
        """Detached: stdout and stderr, which children inherit, go to the log."""
        self._stdio = True
        self.stream.flush()
        for fd in (1, 2):
            os.dup2(self.stream.fileno(), fd)

    def reopen(self) -> None:
        """SIGUSR1, after logrotate moved the file: continue in a new one."""
        try:
            new = self._open()
        except SocketProtectorError as e:
            _log.warning("%s; still writing to the old one", e)
            return
        old = self.handler.setStream(new)
        self.stream = new
        if self._stdio:
            self.take_stdio()   # children started from now on write to the new file
        if old is not None:
            old.close()
        _log.info("reopened log file %s", self.path)

    def close(self) -> None:
        self.stream.close()


def _configure_logging(opts: argparse.Namespace, log_file: Optional[_LogFile]) -> None:
    _log.setLevel(logging.DEBUG if opts.verbose else logging.INFO)
    _log.propagate = False
    if log_file is not None:
        handler: logging.Handler = log_file.handler
    elif opts.foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("socketprotector[%(process)d]: %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log", facility="daemon")
        handler.setFormatter(logging.Formatter("socketprotector[%(process)d]: %(message)s"))
    else:
        print("socketprotector: warning: no --log-file and no syslog (/dev/log): the "
              "detached daemon's log goes nowhere", file=sys.stderr)
        handler = logging.NullHandler()
    _log.handlers[:] = [handler]


def _install_signals(wakeup: socket.socket) -> None:
    signal.set_wakeup_fd(wakeup.fileno(), warn_on_full_buffer=False)
    for sig in _HANDLED_SIGNALS:
        signal.signal(sig, _ignore_signal)
    # After an upgrade they come blocked (held pending through the exec):
    # what arrived meanwhile is delivered now, to the handlers above.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED_SIGNALS)


def _ignore_signal(signum, frame) -> None:
    """The handler does nothing: the loop reads the signal from the wakeup socket."""


def _serve(opts: argparse.Namespace) -> None:
    """Everything after parsing, in order: what needs root (pid file, port, log
    file), then detach, then drop privileges, then supervise.  After an
    upgrade (the same process, the new code) all of it is taken over instead."""
    inherited = _inherited_state()
    if not inherited:
        _close_inherited()      # an upgrade's exec inherits its own, on purpose
    # The file an upgrade checks and execs, as the user named it: started in
    # /srv/app/current, the current release's, not the one it resolves to now.
    script = (inherited["script"] if inherited else
              os.path.normpath(os.path.join(_logical_cwd(), sys.argv[0])))
    if inherited:
        # As resolved where the daemon started (a detached one now runs in /).
        cwd, envdir = inherited["cwd"], inherited.get("envdir", opts.envdir)
    else:
        envdir = opts.envdir
        cwd = _working_directory(opts.chdir)
        _resolve_command(opts.command[0], cwd)      # fail before detaching
        if opts.envdir:
            _read_envdir(opts.envdir)
    user = _resolve_user(opts.user) if opts.user and not inherited else None
    owner = (user[0].pw_uid, user[1]) if user else None
    log_file = (_LogFile(inherited["log_file"]["path"], inherited=inherited["log_file"])
                if inherited and inherited["log_file"] else
                _LogFile(opts.log_file, owner) if opts.log_file else None)
    _configure_logging(opts, log_file)
    pid_file = (_PidFile(inherited["pid_file"]["path"], inherited["pid_file"]["fd"])
                if inherited and inherited["pid_file"] else
                _PidFile(opts.pid_file) if opts.pid_file else None)
    launcher = notifier = state_file = None
    helper: Optional[_SocketHelper] = None     # --user with steering (a root process)
    helper_error: Optional[str] = None
    listeners: List[socket.socket] = []
    made: List[tuple] = []          # Unix sockets we created, to remove at exit
    try:
        if inherited:
            listeners = [_adopt_socket(fd) for fd in inherited["supervisor"]["listeners"]]
            activated, made = inherited["activated"], [tuple(m) for m in inherited["made"]]
        else:
            listeners = _activated_listeners()
            activated = bool(listeners)
            if not listeners:
                listeners = _open_listeners(
                    opts, owner, made, reuse_port=_why_not_steer(opts, False) is None)
        for sock in listeners:
            # Activation: the children get them as systemd passes them, blocking.
            sock.setblocking(opts.handoff == "activation")
        if not opts.foreground and not inherited:
            launcher = _Launcher(opts.ready_timeout)
            launcher.detach()
            if log_file is not None:
                log_file.take_stdio()
        if inherited and inherited["state_file"]:
            state_file = _StateFile(pid_file.path, inherited["state_file"])
        elif pid_file is not None:
            pid_file.write(os.getpid())
            state_file = _StateFile(pid_file.path)
        _become_subreaper()     # imports ctypes: before --user may lose access to it
        if (user is not None and os.geteuid() == 0
                and _why_not_steer(opts, activated) is None):
            helper, helper_error = _start_helper(listeners, opts.backlog)
        if user is not None:
            if opts.handoff == "activation":
                import tempfile     # noqa: F401 for _notify_address(): as the user,
                                    # the interpreter's own files may be out of reach
            _drop_privileges(*user)
        if os.environ.get("NOTIFY_SOCKET"):
            notifier = _SystemdNotifier(os.environ["NOTIFY_SOCKET"])
        sinks = [sink.on_event for sink in (launcher, notifier, state_file)
                 if sink is not None]
        if inherited:
            _log.info("socketprotector %s took over from %s (upgrade in place, pid %d)",
                      __version__, inherited["from"], os.getpid())
        else:
            _log.info("listening on %s%s", ", ".join(map(_format_address, listeners)),
                      " (socket activation)" if activated else "")
        steering, steering_off = _steering_for(opts, activated, listeners, inherited,
                                               helper, helper_error)
        nofile = inherited.get("nofile") if inherited else _raise_nofile()
        # Activation and listener modes need steering for it.
        probation = (opts.probation if steering is not None or opts.handoff == "forward"
                     else 0.0)
        if state_file is not None:
            state_file.describe({
                "handoff": opts.handoff,
                "steering": None if opts.handoff == "forward" else
                {"active": steering is not None, "fallback_reason": steering_off},
                # What --reload, --stop and --upgrade wait by (seconds).
                "limits": {"ready_timeout": opts.ready_timeout, "probation": probation,
                           "stop_timeout": opts.stop_timeout, "kill_grace": _KILL_GRACE,
                           "drain_timeout": opts.drain_timeout,
                           "upgrade_check_timeout": _UPGRADE_CHECK_TIMEOUT}})

        def exec_upgrade(supervisor_state: dict, fds: List[int]) -> str:
            """Hand everything to the new code and exec it; why not, if it failed."""
            files = [f.export() if f is not None else None
                     for f in (pid_file, state_file, log_file)]
            state = {"version": _STATE_VERSION, "from": __version__, "script": script,
                     "cwd": cwd, "envdir": envdir, "activated": activated, "made": made,
                     "nofile": nofile, "steering_off": steering_off,
                     "pid_file": files[0], "state_file": files[1], "log_file": files[2],
                     "supervisor": supervisor_state}
            return _exec_self(script, state, [*fds, *(f["fd"] for f in files if f)])
        wake_r, wake_w = socket.socketpair()
        with wake_r, wake_w:
            wake_r.setblocking(False)
            wake_w.setblocking(False)
            _install_signals(wake_w)
            supervisor = _Supervisor(
                listeners, opts.command, cwd=cwd, ready_timeout=opts.ready_timeout,
                drain_timeout=opts.drain_timeout, stop_timeout=opts.stop_timeout,
                wakeup=wake_r, handoff=opts.handoff, hang_timeout=opts.hang_timeout,
                backlog=opts.backlog, workers=opts.workers, envdir=envdir,
                on_event=lambda event, detail: [sink(event, detail) for sink in sinks],
                on_reopen=log_file.reopen if log_file else lambda: None,
                on_state=state_file.on_state if state_file else lambda snapshot: None,
                output=None if opts.foreground else
                f"its output is in {log_file.path}" if log_file else
                "its output went to /dev/null: pass --log-file to keep it",
                ready_delay=opts.ready_delay, stop_signal=opts.stop_signal, script=script,
                on_upgrade=exec_upgrade,
                restore=inherited["supervisor"] if inherited else None,
                steering=steering, quiet_period=opts.quiet_period, probation=probation,
                child_nofile=nofile, upgraded_from=inherited["from"] if inherited else None)
            try:
                supervisor.run()
            finally:
                signal.set_wakeup_fd(-1)
        _log.info("stopped")
    except SocketProtectorError as e:
        for sink in (launcher, notifier):
            if sink is not None:
                sink.on_event("failed", str(e))
        raise
    finally:
        if helper is not None:
            helper.stop()       # the steering's, stopped already if the supervisor ran
        for sock in listeners:
            sock.close()
        _remove_unix_paths(made)
        if notifier is not None:
            notifier.close()
        if state_file is not None:
            state_file.remove()
        if pid_file is not None:
            pid_file.release()
        if log_file is not None:
            log_file.close()


def _raise_nofile() -> Optional[int]:
    """Raise our soft RLIMIT_NOFILE to the hard limit: what the daemon holds,
    parks and has in flight to its children counts against it (in flight,
    for a user without CAP_SYS_RESOURCE).  The soft limit the children get
    back, or None if it was not raised."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return None
    return soft


def _why_not_steer(opts: argparse.Namespace, activated: bool) -> Optional[str]:
    """Why restarts in activation or listener mode cannot give each
    generation a socket of its own (None: they can); "" forwarding."""
    if opts.handoff == "forward":
        return ""
    if activated:
        return "systemd passed the sockets"
    if any(kind == "unix" for kind, _, _ in opts.binds):
        return "a unix: address"
    return None


def _start_helper(listeners: List[socket.socket], backlog: int) -> tuple:
    """--user with steering (activation or listener mode), still root: (the socket helper, None), or
    (None, why it could not be started)."""
    try:
        return _SocketHelper.start(listeners, backlog), None
    except OSError as e:
        return None, f"--user: cannot start the socket helper that keeps root: {e.strerror}"


def _steering_for(opts: argparse.Namespace, activated: bool, listeners: List[socket.socket],
                  inherited: Optional[dict], helper: Optional[_SocketHelper] = None,
                  helper_error: Optional[str] = None) -> tuple:
    """Activation and listener modes: a _Steering over the daemon's sockets
    (with the socket helper --user started, which it then owns), or None
    (and one line saying what is lost) where the setup or the kernel
    refuses; and why not (None: steering, or forwarding)."""
    if inherited is not None:       # as the code before the upgrade had it
        if inherited["supervisor"].get("steering"):
            return _Steering(listeners, opts.backlog, attach=False), None
        return None, inherited.get("steering_off") or _why_not_steer(opts, activated) or None
    why = _why_not_steer(opts, activated)
    if why == "":
        return None, None
    if why is None:
        why = helper_error
    if why is None:
        try:
            steering = _Steering(listeners, opts.backlog, helper=helper)
        except OSError as e:
            why = f"the kernel refused the steering program: {e.strerror}"
            if helper is not None:
                helper.stop()
        else:
            _log.info("each generation listens on sockets of its own; new connections go to "
                      "the serving one's (SO_REUSEPORT, BPF); %s", "what waits on a generation "
                      "rolled back moves to the one serving (net.ipv4.tcp_migrate_req)"
                      if _migrates_queues() else "net.ipv4.tcp_migrate_req is off: what waits "
                      "on a generation rolled back is reset")
            return steering, None
    _log.warning("restarts share one listening socket (%s): an old server may take new "
                 "connections until it stops", why)
    return None, why


def _logical_cwd() -> str:
    """The start directory as the user named it: $PWD when it is the same
    directory as getcwd() (which has resolved every symbolic link).  It may
    go through a link that a deploy switches (/srv/app/current ->
    releases/42), and what is named through it is resolved again later."""
    here = os.getcwd()
    logical = os.environ.get("PWD", "")
    try:
        if os.path.isabs(logical) and os.path.samefile(logical, here):
            return logical
    except OSError:
        pass
    return here


def _working_directory(chdir: Optional[str]) -> str:
    """Where the children run, as the user named it: --chdir (relative to
    the start directory), else the start directory itself (_logical_cwd()),
    resolved again by each new child.  SocketProtectorError if it does not
    exist."""
    here = _logical_cwd()
    where = os.path.join(here, chdir) if chdir else here
    try:
        if not stat.S_ISDIR(os.stat(where).st_mode):
            raise SocketProtectorError(f"--chdir {chdir}: not a directory")
    except OSError as e:
        raise SocketProtectorError(f"cannot enter {where}: {e.strerror}") from None
    return where


def _read_envdir(path: str) -> dict:
    """--envdir, read again for every new child: {NAME: value, or None to
    remove NAME}.  As daemontools' envdir: one variable per file, the file's
    name its name, its first line (trailing blanks removed) its value; an
    empty file removes the variable."""
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise _SpawnError(f"cannot read --envdir {path}: {e.strerror}") from None
    env: dict = {}
    for name in names:
        if name.startswith(".") or "=" in name:
            continue
        data = _read_envdir_file(path, name)
        if data is None:
            continue
        if not data:
            env[name] = None
            continue
        value = data.split(b"\n", 1)[0].rstrip(b" \t").replace(b"\0", b"\n")
        env[name] = os.fsdecode(value)
    return env


def _read_envdir_file(path: str, name: str) -> Optional[bytes]:
    """The start of one --envdir file; None for a directory, and None with a
    line for anything else that is not a regular file.  Opened without
    blocking: a FIFO there must not stop the daemon's loop."""
    where = os.path.join(path, name)
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        if e.errno == errno.EISDIR:
            return None
        raise _SpawnError(f"cannot read --envdir {where}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                _log.warning("--envdir: skipped %s: not a regular file", where)
            return None
        try:
            return os.read(fd, 65536)
        except OSError as e:
            raise _SpawnError(f"cannot read --envdir {where}: {e.strerror}") from None
    finally:
        os.close(fd)


def _resolve_user(spec: str) -> tuple:
    """USER[:GROUP] (names or numbers) as (name, uid, gid); the user's group by default."""
    name, _, group = spec.partition(":")
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise UsageError(f"--user: unknown user {name!r}") from None
    gid = entry.pw_gid
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise UsageError(f"--user: unknown group {group!r}") from None
    if os.geteuid() != 0 and os.geteuid() != entry.pw_uid:
        raise SocketProtectorError(f"--user {spec}: only root can switch users")
    return entry, gid


def _drop_privileges(entry, gid: int) -> None:
    """Become the user (with its supplementary groups); children inherit it."""
    try:
        if os.geteuid() == 0:
            os.initgroups(entry.pw_name, gid)
            os.setgid(gid)
            os.setuid(entry.pw_uid)
    except OSError as e:
        raise SocketProtectorError(f"--user {entry.pw_name}: {e.strerror}") from None
    os.environ.update(USER=entry.pw_name, LOGNAME=entry.pw_name, HOME=entry.pw_dir)
    _log.info("running as user %s (uid %d, gid %d)", entry.pw_name, entry.pw_uid, gid)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the daemon; return the exit code (0 ok, 1 runtime failure, 2 usage)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--upgrade-check"]:
        return _upgrade_check(argv[1:])
    if sys.version_info < (3, 9):
        print(f"socketprotector: needs Python 3.9 or newer, not "
              f"{sys.version_info[0]}.{sys.version_info[1]}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        opts = _parse_args(argv)
        if opts.reload or opts.stop or opts.status or opts.upgrade:
            return _control(opts)
        _serve(opts)
    except UsageError as e:
        print(f"socketprotector: {e}\nusage: {_USAGE} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    except SocketProtectorError as e:
        print(f"socketprotector: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
