#!/usr/bin/env python3
"""uvicorn restarted under load: one socket per generation (steering) against
one shared socket, as systemd socket activation passes it.

    python3 bench/uvicorn_restarts.py [--uvicorn PATH] [--restarts N] [--rounds R]

The same ASGI app and the same load (closed-loop HTTP GETs from four
threads, a new connection each) against socketprotector --handoff
activation in two set-ups, each restarted (SIGHUP) N times, one restart as
soon as the previous one has finished and ten more requests have been
answered:

* steering: the daemon opened the port itself, so each generation of
  uvicorn gets a socket of its own and new connections go to the serving
  one (the default);
* shared: the port is passed to the daemon as systemd passes it (fd 3,
  LISTEN_FDS), so every generation shares that one socket, as under systemd
  itself (the daemon says so in one line and restarts as before).

The rounds alternate between the two.  It prints, per round and in all,
requests, failed ones (anything but a 200: resets, empty replies,
time-outs) and failures per 100 restarts.  uvicorn comes from .ci/venv
(bash .ci/run installs it) unless --uvicorn names one.
"""

import argparse
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
APP = '''
import os
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"%d\\n" % os.getpid()})
'''


class Daemon:
    """socketprotector in the foreground, its log read by a thread."""

    def __init__(self, argv, cwd, pass_fds=()):
        self.proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     pass_fds=pass_fds, start_new_session=True)
        self.lines = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip())
                self._cond.notify_all()

    def wait_for(self, pattern, start=0, timeout=30.0):
        regex, deadline = re.compile(pattern), time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    match = regex.search(line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise SystemExit(f"no {pattern!r} in the daemon's log:\n"
                                     + "\n".join(self.lines[-20:]))
                self._cond.wait(left)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Load:
    """Closed-loop GETs from threads, each on a new connection."""

    def __init__(self, port, threads=4):
        self.port, self.ok, self.failed = port, 0, []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self):
        while not self._stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("GET", "/", headers={"Connection": "close"})
                response = conn.getresponse()
                response.read()
                good = response.status == 200
                failure = None if good else f"status {response.status}"
            except Exception as e:      # every kind of failure counts
                good, failure = False, type(e).__name__
            finally:
                conn.close()
            with self._lock:
                if good:
                    self.ok += 1
                else:
                    self.failed.append(failure)

    def wait_for(self, count):
        start = self.ok + len(self.failed)
        while self.ok + len(self.failed) < start + count:
            time.sleep(0.005)

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(10)


def run(mode, uvicorn, restarts, workdir):
    """One round: (requests, failures, failure kinds)."""
    command = ["--", uvicorn, "--fd", "3", "--log-level", "warning", "app:app"]
    daemon_argv = [sys.executable, os.path.join(ROOT, "socketprotector.py"), "-f",
                   "--handoff", "activation"]
    if mode == "steering":
        port = None
        daemon = Daemon([*daemon_argv, "--bind", "127.0.0.1", "0", *command], workdir)
    else:
        listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        port = listener.getsockname()[1]
        moved = listener.fileno() != 3
        if moved:
            os.dup2(listener.fileno(), 3)   # as systemd passes it: fd 3, LISTEN_FDS=1
        argv = ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh", *daemon_argv,
                "0", *command]
        daemon = Daemon(argv, workdir, pass_fds=(3,))
        if moved:
            os.close(3)
        listener.close()
    try:
        match = daemon.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
        port = port or int(match.group(1))
        daemon.wait_for(r"ready, serving")
        load = Load(port)
        load.wait_for(20)
        for _ in range(restarts):
            mark = len(daemon.lines)
            daemon.proc.send_signal(signal.SIGHUP)
            daemon.wait_for(r"ready; child \d+ retiring", mark)
            load.wait_for(10)
        load.stop()
    finally:
        daemon.stop()
    kinds = {}
    for failure in load.failed:
        kinds[failure] = kinds.get(failure, 0) + 1
    return load.ok + len(load.failed), len(load.failed), kinds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uvicorn", default=os.path.join(ROOT, ".ci", "venv", "bin", "uvicorn"))
    parser.add_argument("--restarts", type=int, default=50, help="restarts per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each set-up")
    args = parser.parse_args()
    if not os.access(args.uvicorn, os.X_OK):
        sys.exit(f"no uvicorn at {args.uvicorn}: run `bash .ci/run` once, or give --uvicorn")
    totals = {"steering": [0, 0, 0], "shared": [0, 0, 0]}
    with tempfile.TemporaryDirectory() as workdir:
        with open(os.path.join(workdir, "app.py"), "w") as f:
            f.write(APP)
        for n in range(args.rounds):
            for mode in ("shared", "steering") if n % 2 else ("steering", "shared"):
                requests, failed, kinds = run(mode, args.uvicorn, args.restarts, workdir)
                total = totals[mode]
                total[0] += requests
                total[1] += failed
                total[2] += args.restarts
                print(f"round {n + 1} {mode:8}: {requests:7d} requests, {failed:4d} failed "
                      f"over {args.restarts} restarts {kinds or ''}", flush=True)
    print(f"\n{'':10}{'restarts':>9}{'requests':>10}{'failed':>8}{'failed per 100 restarts':>25}")
    for mode, (requests, failed, restarts) in totals.items():
        print(f"{mode:10}{restarts:9d}{requests:10d}{failed:8d}{100 * failed / restarts:25.1f}")


if __name__ == "__main__":
    main()
