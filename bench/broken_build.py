#!/usr/bin/env python3
"""What a restart to a broken build costs while it is rolled back: this
daemon against a baseline one, on gunicorn gthread without --preload.

    python3 bench/broken_build.py [--gunicorn PATH] [--baseline PATH] [--rounds R] [--rate N]

Each round starts socketprotector --handoff activation in front of gunicorn
-k gthread -w 2 (no --preload, so gunicorn says READY=1 before its workers
import the application), lets an open-loop client open --rate new
connections a second (one HTTP/1.0 GET each), swaps the application for a
build whose import sleeps --import-seconds and then raises, and restarts
(SIGHUP to the daemon).  The new gunicorn's workers fail, it exits, and the
daemon rolls the restart back; the client keeps going for a while after that,
then the round ends.  Every connection opened counts: ok (a 200), reset, or
another failure (refused, timed out, empty reply...).  A round whose restart
is not rolled back stops the bench.

The rounds alternate between this daemon (socketprotector.py beside bench/)
and the baseline, each with one failed restart per round; it prints each
round, then the median and range of failed connections per failed restart
for each, and the ratio of their totals.  The baseline defaults to
socketprotector.py at commit a6c2a4a, the last before a generation ready by
READY=1 alone got only a share of new connections, extracted with `git show`
into a temporary directory (so git and this repository's history are needed
unless --baseline names a file).  Whether net.ipv4.tcp_migrate_req is on
changes the result (a rolled-back generation's queue moves instead of being
reset): it says which.  gunicorn comes from .ci/venv (bash .ci/run installs
it) unless --gunicorn names one.
"""

import argparse
import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from uvicorn_restarts import Daemon

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BASELINE_COMMIT = "a6c2a4a"
GOOD_APP = '''
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\\n"]
'''
BROKEN_APP = '''
import time
time.sleep({seconds})       # a big application loading ...
raise ImportError("broken build")     # ... that fails
'''
BEFORE = 1.0        # seconds of load before the restart
AFTER = 1.5         # and after the rollback, before the round ends
TIMEOUT = 10.0      # per connection


class OpenLoop:
    """New connections at a fixed rate, whatever happens to earlier ones:
    one GET each, on a thread of its own."""

    def __init__(self, port, rate):
        self.port, self.rate = port, rate
        self.results = []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = []
        self._opener = threading.Thread(target=self._open, daemon=True)
        self._opener.start()

    def _open(self):
        due = time.monotonic()
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            thread = threading.Thread(target=self._one, daemon=True)
            thread.start()
            self._threads.append(thread)
            due += 1 / self.rate

    def _one(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as conn:
                conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                reply = b""
                while True:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
            status = reply.split(b"\r\n", 1)[0].split(b" ")[1:2]
            result = ("ok" if status == [b"200"] else "empty reply" if not reply else
                      f"status {b''.join(status).decode(errors='replace')}")
        except ConnectionResetError:
            result = "reset"
        except socket.timeout:
            result = "timed out"
        except OSError as e:
            result = type(e).__name__
        with self._lock:
            self.results.append(result)

    def stop(self):
        """Opens no more; waits for those open (each has TIMEOUT)."""
        self._stop.set()
        self._opener.join()
        for thread in self._threads:
            thread.join(TIMEOUT + 5)


class Round(Daemon):
    """One daemon for one round; stopped with everything it started."""

    def stop(self):
        super().stop()
        # Its children lead process groups of their own.  It stops them when
        # it stops; should it have been killed instead, they are stopped here.
        children = {int(pid) for line in self.lines
                    for pid in re.findall(r"\bchild (\d+)", line)}
        for pid in children:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def one_round(daemon_py, args, workdir, interrupts):
    """Counts of ok / reset / other results, and the other kinds."""
    with open(os.path.join(workdir, "app.py"), "w") as f:
        f.write(GOOD_APP)
    daemon = load = None
    try:
        with interrupts.held_back():
            daemon = Round([sys.executable, daemon_py, "-f", "--handoff", "activation",
                            "--bind", "127.0.0.1", "0", "--", args.gunicorn,
                            "--no-control-socket", "-k", "gthread", "-w", "2", "app:app"],
                           workdir)
        port = int(daemon.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        daemon.wait_for(r"ready, serving")
        load = OpenLoop(port, args.rate)
        time.sleep(BEFORE)
        with open(os.path.join(workdir, "app.py"), "w") as f:
            f.write(BROKEN_APP.format(seconds=args.import_seconds))
        mark = len(daemon.lines)
        daemon.proc.send_signal(signal.SIGHUP)
        failed = daemon.wait_for(r"restart failed|passed probation", mark)
        if failed.group(0) != "restart failed":
            raise SystemExit(f"{os.path.basename(daemon_py)}: the restart to the broken build "
                             f"was not rolled back ({failed.string!r})")
        time.sleep(AFTER)
    finally:
        with interrupts.held_back():
            if load is not None:
                load.stop()
            if daemon is not None:
                daemon.stop()
    kinds = {}
    for result in load.results:
        kinds[result] = kinds.get(result, 0) + 1
    ok, reset = kinds.pop("ok", 0), kinds.pop("reset", 0)
    return ok, reset, sum(kinds.values()), kinds


def baseline_file(workdir):
    """socketprotector.py at BASELINE_COMMIT, written into workdir."""
    try:
        source = subprocess.run(["git", "-C", ROOT, "show", f"{BASELINE_COMMIT}:socketprotector.py"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        why = e.stderr.decode(errors="replace").strip() if getattr(e, "stderr", None) else e
        raise SystemExit(f"cannot extract the baseline with git ({why}): give --baseline PATH")
    path = os.path.join(workdir, f"socketprotector-{BASELINE_COMMIT}.py")
    with open(path, "wb") as f:
        f.write(source)
    return path


def migrate_req():
    try:
        with open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
            return "on" if f.read().strip() == "1" else "off"
    except OSError:
        return "not there"


class Interrupts:
    """Ctrl-C or SIGTERM raises KeyboardInterrupt once, never while a daemon
    is being started or stopped (held_back): then as soon as that is done."""

    def __init__(self):
        self._held, self._pending, self._raised = 0, False, False
        signal.signal(signal.SIGINT, self._handler)
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self._pending = True
        if not self._held:
            self._raise()

    def _raise(self):
        if not self._raised:
            self._raised = True
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held_back(self):
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            if self._pending and not self._held:
                self._raise()


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"--baseline defaults to socketprotector.py at commit {BASELINE_COMMIT} (before the "
               "share), extracted with `git show` into a temporary file: that needs git and this "
               "repository's history.")
    parser.add_argument("--gunicorn", default=os.path.join(ROOT, ".ci", "venv", "bin", "gunicorn"))
    parser.add_argument("--baseline", metavar="PATH",
                        help=f"the daemon to compare with (socketprotector.py at {BASELINE_COMMIT})")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each daemon (3)")
    parser.add_argument("--rate", type=float, default=50.0,
                        help="new connections a second, open loop (50)")
    parser.add_argument("--import-seconds", type=float, default=1.5,
                        help="how long the broken build's import takes before it raises (1.5)")
    args = parser.parse_args()
    if not os.access(args.gunicorn, os.X_OK):
        sys.exit(f"no gunicorn at {args.gunicorn}: run `bash .ci/run` once, or give --gunicorn")
    if args.baseline is not None and not os.path.isfile(args.baseline):
        sys.exit(f"no baseline daemon at {args.baseline}")
    if args.rounds < 1 or args.rate <= 0:
        sys.exit("--rounds and --rate must be positive")
    interrupts = Interrupts()
    this = os.path.join(ROOT, "socketprotector.py")
    counts = {"this": [], "baseline": []}
    try:
        with tempfile.TemporaryDirectory(prefix="broken-build-") as workdir:
            daemons = {"this": this,
                       "baseline": os.path.abspath(args.baseline) if args.baseline
                       else baseline_file(workdir)}
            print(f"{args.rate:g} new connections/s over a restart of gunicorn -k gthread -w 2 "
                  f"(no --preload) to a build whose import takes {args.import_seconds:g} s and "
                  f"raises; net.ipv4.tcp_migrate_req {migrate_req()}; baseline "
                  f"{args.baseline or BASELINE_COMMIT}", flush=True)
            for n in range(args.rounds):
                for name in ("baseline", "this") if n % 2 else ("this", "baseline"):
                    ok, reset, other, kinds = one_round(daemons[name], args, workdir, interrupts)
                    counts[name].append((ok, reset, other))
                    print(f"round {n + 1} {name:8}: {ok:4d} ok, {reset:3d} reset, {other:3d} other "
                          f"{kinds or ''}", flush=True)
    except KeyboardInterrupt:
        sys.exit("interrupted")
    print(f"\nfailed connections per failed restart, over {args.rounds} rounds each:")
    failed = {name: [reset + other for _, reset, other in rounds]
              for name, rounds in counts.items()}
    for name, values in failed.items():
        print(f"  {name:8}  median {statistics.median(values):5g}  range "
              f"{min(values)}-{max(values)}  (ok per round: median "
              f"{statistics.median(ok for ok, _, _ in counts[name]):g})")
    this_total, base_total = sum(failed["this"]), sum(failed["baseline"])
    print("  baseline / this, totals: "
          + (f"{base_total / this_total:.1f}" if this_total else
             f"{base_total} / 0 (none failed with this daemon)"))


if __name__ == "__main__":
    main()
