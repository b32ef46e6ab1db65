#!/usr/bin/env python3
"""A restart of a uvicorn whose lifespan startup is slow: readiness seen
(epoll, from /proc) against --ready-delay, a guess.

    python3 bench/slow_start.py [--uvicorn PATH] [--startup S] [--rounds R]

uvicorn sends no READY=1.  socketprotector --handoff activation takes it as
ready once it is seen waiting on its listening socket (in epoll, read from
/proc), which uvicorn does only after its lifespan startup; before it could
see that, a server that says nothing was taken as ready after --ready-delay
S seconds, whatever it was doing.  Each round starts socketprotector
--handoff activation --bind 127.0.0.1 0 in front of uvicorn --fd 3 and an
ASGI app whose lifespan startup sleeps --startup seconds (5), lets three
threads send closed-loop HTTP GETs (a new connection each) once it answers,
restarts it (SIGHUP to the daemon) and goes on until the new uvicorn has
passed its probation (or the restart has been rolled back), then for
AFTER seconds more.  Two set-ups:

* seen: no --ready-delay (the default): ready once seen waiting;
* guess: --ready-delay 1, as a server that says nothing was taken before.

The rounds alternate between the two.  It records every request's latency
and outcome (a 200, or the kind of failure: reset, empty reply, time-out...)
and prints, per round, requests, failed ones, the median and the longest
latency (the longest wait, at the switch) and how long after the SIGHUP the
daemon took the new uvicorn as ready; then per set-up the totals and the
median and range of the rounds' longest waits.  uvicorn comes from .ci/venv
(bash .ci/run installs it) unless --uvicorn names one.
"""

import argparse
import http.client
import os
import signal
import statistics
import sys
import tempfile
import threading
import time

from broken_build import Interrupts, Round

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
APP = '''
import asyncio, os
STARTUP = float(os.environ["SLOW_START_SECONDS"])

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.sleep(STARTUP)        # a slow application start
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"%d\\n" % os.getpid()})
'''
SETUPS = {"seen": [], "guess": ["--ready-delay", "1"]}
THREADS = 3
AFTER = 2.0         # seconds of load after the probation
TIMEOUT = 30.0      # per request


class Load:
    """Closed-loop GETs from threads, each on a new connection; every
    request's latency and outcome ("ok" or the kind of failure)."""

    def __init__(self, port, threads=THREADS):
        self.port, self.results = port, []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self):
        while not self._stop.is_set():
            start = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
            try:
                conn.request("GET", "/", headers={"Connection": "close"})
                response = conn.getresponse()
                response.read()
                outcome = "ok" if response.status == 200 else f"status {response.status}"
            except Exception as e:      # every kind of failure counts
                outcome = type(e).__name__
            finally:
                conn.close()
            with self._lock:
                self.results.append((time.monotonic() - start, outcome))

    def wait_for(self, count):
        while len(self.results) < count:
            time.sleep(0.005)

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(TIMEOUT + 5)


def first_answer(port, timeout):
    """Waits until the first uvicorn answers (its startup done)."""
    deadline = time.monotonic() + timeout
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise SystemExit("the first uvicorn never answered")
        time.sleep(0.1)


def one_round(setup, args, workdir, interrupts):
    """[(latency, outcome)], seconds from the SIGHUP to the new one taken as
    ready, and how the restart ended ("passed" or the daemon's line)."""
    daemon = load = None
    try:
        with interrupts.held_back():
            daemon = Round([sys.executable, os.path.join(ROOT, "socketprotector.py"), "-f",
                            "--handoff", "activation", *SETUPS[setup], "--bind", "127.0.0.1",
                            "0", "--", args.uvicorn, "--fd", "3", "--log-level", "warning",
                            "app:app"], workdir)
        port = int(daemon.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        daemon.wait_for(r"ready, serving", timeout=args.startup + 30)
        first_answer(port, args.startup + 30)
        load = Load(port)
        load.wait_for(20)
        mark = len(daemon.lines)
        sighup = time.monotonic()
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for(r"ready; child \d+ retiring|restart failed", mark,
                        timeout=args.startup + 30)
        switch = time.monotonic() - sighup
        end = daemon.wait_for(r"passed probation|restart failed.*", mark,
                              timeout=args.startup + 30).group(0)
        time.sleep(AFTER)
    finally:
        with interrupts.held_back():
            if load is not None:
                load.stop()
            if daemon is not None:
                daemon.stop()
    return load.results, switch, "passed" if end == "passed probation" else end


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uvicorn", default=os.path.join(ROOT, ".ci", "venv", "bin", "uvicorn"))
    parser.add_argument("--startup", type=float, default=5.0,
                        help="seconds the app's lifespan startup sleeps (5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each set-up (3)")
    args = parser.parse_args()
    if not os.access(args.uvicorn, os.X_OK):
        sys.exit(f"no uvicorn at {args.uvicorn}: run `bash .ci/run` once, or give --uvicorn")
    if args.rounds < 1 or args.startup < 0:
        sys.exit("--rounds must be positive and --startup not negative")
    os.environ["SLOW_START_SECONDS"] = repr(args.startup)
    interrupts = Interrupts()
    rounds = {setup: [] for setup in SETUPS}
    try:
        with tempfile.TemporaryDirectory(prefix="slow-start-") as workdir:
            with open(os.path.join(workdir, "app.py"), "w") as f:
                f.write(APP)
            print(f"a restart of uvicorn --fd 3 (lifespan startup {args.startup:g} s) under "
                  f"{THREADS} closed-loop HTTP clients; seen: no --ready-delay, guess: "
                  f"{' '.join(SETUPS['guess'])}", flush=True)
            for n in range(args.rounds):
                for setup in ("guess", "seen") if n % 2 else ("seen", "guess"):
                    results, switch, end = one_round(setup, args, workdir, interrupts)
                    rounds[setup].append(results)
                    latencies = [latency for latency, _ in results]
                    kinds = {}
                    for _, outcome in results:
                        if outcome != "ok":
                            kinds[outcome] = kinds.get(outcome, 0) + 1
                    print(f"round {n + 1} {setup:5}: {len(results):5d} requests, "
                          f"{sum(kinds.values()):3d} failed, median "
                          f"{1000 * statistics.median(latencies):5.1f} ms, longest "
                          f"{1000 * max(latencies):6.0f} ms; taken as ready {switch:.1f} s "
                          f"after the SIGHUP; {end} {kinds or ''}", flush=True)
    except KeyboardInterrupt:
        sys.exit("interrupted")
    print(f"\n{'':7}{'requests':>9}{'failed':>8}{'median':>10}{'longest wait':>14}"
          f"{'longest wait per round: median (range)':>42}")
    for setup, per_round in rounds.items():
        results = [r for results in per_round for r in results]
        longest = [max(latency for latency, _ in results) for results in per_round]
        failed = sum(1 for _, outcome in results if outcome != "ok")
        print(f"{setup:7}{len(results):9d}{failed:8d}"
              f"{1000 * statistics.median(l for l, _ in results):7.1f} ms"
              f"{1000 * max(longest):11.0f} ms"
              f"{1000 * statistics.median(longest):27.0f} ms ({1000 * min(longest):.0f}-"
              f"{1000 * max(longest):.0f} ms)")


if __name__ == "__main__":
    main()
