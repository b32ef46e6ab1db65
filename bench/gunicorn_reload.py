#!/usr/bin/env python3
"""gunicorn reloading itself against gunicorn behind socketprotector.

    python3 bench/gunicorn_reload.py [--gunicorn PATH] [--duration S] [--every S]

The same WSGI app and the same load (closed-loop HTTP GETs from four
threads, a new connection each) against two set-ups, each reloaded every
--every seconds for --duration seconds:

* gunicorn alone, reloaded with its own SIGHUP (new workers, old ones
  stopped gracefully);
* gunicorn --preload behind socketprotector --handoff activation,
  reloaded with SIGHUP to socketprotector (a new gunicorn, started first).

It counts requests and failed ones (anything but a 200).  gunicorn comes
from .ci/venv (bash .ci/run installs it) unless --gunicorn names one.
"""

import argparse
import http.client
import os
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
import os, time
time.sleep(float(os.environ.get("BENCH_IMPORT_SECONDS", "0")))   # a big app loading
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"%d\\n" % os.getpid()]
'''


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def load(port, duration, keep_alive, threads=4):
    """(requests, failures, one example failure, longest wait) of closed-loop GETs."""
    counts, lock, example = [0, 0, 0.0], threading.Lock(), []
    deadline = time.monotonic() + duration

    def run():
        conn = None
        while time.monotonic() < deadline:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            start = time.monotonic()
            try:
                conn.request("GET", "/", headers={} if keep_alive else {"Connection": "close"})
                response = conn.getresponse()
                response.read()
                failed = response.status != 200
                error = f"HTTP {response.status}"
                if response.will_close or not keep_alive:
                    conn.close()
                    conn = None
            except Exception as e:
                failed, error = True, repr(e)
                conn.close()
                conn = None
            with lock:
                counts[0] += 1
                counts[1] += failed
                counts[2] = max(counts[2], time.monotonic() - start)
                if failed and not example:
                    example.append(error)
        if conn is not None:
            conn.close()
    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return counts[0], counts[1], example[0] if example else "", counts[2]


def measure(name, argv, reload_pid, port, args, cwd):
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not answers(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{name}: did not start")
            time.sleep(0.05)
        stop = threading.Event()

        def reloader():
            while not stop.wait(args.every):
                os.kill(reload_pid(proc), signal.SIGHUP)
        thread = threading.Thread(target=reloader)
        thread.start()
        try:
            return load(port, args.duration, args.keep_alive)
        finally:
            stop.set()
            thread.join()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gunicorn", default=os.path.join(ROOT, ".ci", "venv", "bin",
                                                           "gunicorn"))
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per set-up (20)")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between reloads (1)")
    parser.add_argument("--worker-class", default="sync", help="gunicorn -k (sync)")
    parser.add_argument("--keep-alive", action="store_true",
                        help="clients keep their connections open between requests")
    parser.add_argument("--import-seconds", type=float, default=0.0,
                        help="how long the app takes to import, as a large app does (0)")
    args = parser.parse_args()
    if not os.access(args.gunicorn, os.X_OK):
        raise SystemExit(f"no gunicorn at {args.gunicorn}: run bash .ci/run, or pass --gunicorn")
    os.environ["BENCH_IMPORT_SECONDS"] = str(args.import_seconds)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "app.py"), "w") as f:
            f.write(APP)
        common = ["--no-control-socket", "-w", "2", "-k", args.worker_class, "app:app"]
        port = free_port()
        alone = measure("gunicorn alone", [args.gunicorn, "-b", f"127.0.0.1:{port}", *common],
                        lambda proc: proc.pid, port, args, tmp)
        port = free_port()
        behind = measure(
            "behind socketprotector",
            [sys.executable, os.path.join(ROOT, "socketprotector.py"), "-f", "--handoff",
             "activation", "--bind", f"127.0.0.1:{port}", "--", args.gunicorn, "--preload",
             *common], lambda proc: proc.pid, port, args, tmp)
    print(f"{args.duration:g} s of 4 closed-loop HTTP clients"
          f"{' (keep-alive)' if args.keep_alive else ''}, a reload every {args.every:g} s, "
          f"gunicorn -w 2 -k {args.worker_class}, the app importing in "
          f"{args.import_seconds:g} s:")
    for name, (requests, failures, example, longest) in (("gunicorn's own SIGHUP", alone),
                                                         ("behind socketprotector", behind)):
        print(f"  {name:<24} {requests:>7} requests, {failures:>5} failed, longest wait "
              f"{longest * 1000:.0f} ms" + (f" (e.g. {example})" if example else ""))


if __name__ == "__main__":
    main()
