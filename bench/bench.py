#!/usr/bin/env python3
"""What socketprotector costs: the same echo server through it and on its own.

    python3 bench/bench.py              # a table
    python3 bench/bench.py --json       # machine-readable results

One run starts bench/echo_server.py four ways: on its own (listening
itself), through socketprotector forwarding each connection (the default),
through socketprotector with --handoff listener, and, as a reference, behind
bench/bare_forwarder.py, which only accepts and passes each descriptor on:
the price of the extra process hop itself, with none of the safety.  Load
generator processes, each a selectors loop, run closed-loop short sessions
(connect, send 64 bytes, read them back, close with a reset: see ABORT) at
concurrency 1 and 32.  It reports sessions per second, p50/p99/max latency,
the daemon's CPU time per connection (from /proc), and the daemon's peak RSS
beside a bare interpreter's.  Then it repeats under a SIGHUP every 100 ms,
and across one restart whose new server needs 1 s to become ready.

Configurations run interleaved, in a rotating order, and repeated
(--repeat), each reporting its median run, so a noisy neighbour hurts all of
them alike.  Read the ratios (through socketprotector / on its own) first:
absolute figures depend on the machine.  Stdlib only; nothing here is part
of the test suite.
"""

import argparse
import errno
import json
import multiprocessing
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DAEMON = os.path.join(ROOT, "socketprotector.py")
SERVER = os.path.join(HERE, "echo_server.py")
BARE = os.path.join(HERE, "bare_forwarder.py")
PAYLOAD = b"x" * 63 + b"\n"
# Sessions end with a reset, not FIN: a FIN-closed client socket stays in
# TIME_WAIT for 60 s, and at these rates the 28,000 ephemeral ports are all
# in TIME_WAIT within seconds, after which every connect() searches for a
# reusable one.  That cost falls on whichever configuration runs later and
# skewed a ratio by 0.1 (measured); both sides still see the close.
ABORT = struct.pack("ii", 1, 0)
CLK_TCK = os.sysconf("SC_CLK_TCK")

# How each configuration starts the server (its argv), by name.
MODES = {
    "direct": lambda port, server: server,
    "forward": lambda port, server: [sys.executable, DAEMON, "-f", "--bind", "127.0.0.1",
                                     str(port), "--", *server],
    "listener": lambda port, server: [sys.executable, DAEMON, "-f", "--bind", "127.0.0.1",
                                      "--handoff", "listener", str(port), "--", *server],
    # A reference, not socketprotector: the extra hop and nothing else.
    "bare hop": lambda port, server: [sys.executable, BARE, str(port), *server],
}


# ---------------------------------------------------------------------------
# Load generation
# ---------------------------------------------------------------------------


def _drive(port, concurrency, duration, start_at, results):
    """One load process: `concurrency` sessions in flight until the deadline."""
    sel = selectors.DefaultSelector()
    latencies, completions, failures = [], [], 0
    while time.time() < start_at:
        time.sleep(0.001)
    deadline = time.monotonic() + duration

    def begin():
        sock = socket.socket()
        sock.setblocking(False)
        err = sock.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            return False
        sel.register(sock, selectors.EVENT_WRITE, [time.monotonic(), b""])
        return True

    for _ in range(concurrency):
        if not begin():
            failures += 1
    while sel.get_map():
        for key, mask in sel.select(1.0):
            sock, state = key.fileobj, key.data
            ok = None
            try:
                if mask & selectors.EVENT_WRITE:
                    sock.send(PAYLOAD)
                    sel.modify(sock, selectors.EVENT_READ, state)
                    continue
                chunk = sock.recv(4096)
                if not chunk:
                    ok = False
                else:
                    state[1] += chunk
                    if len(state[1]) < len(PAYLOAD):
                        continue
                    ok = state[1] == PAYLOAD
            except OSError:
                ok = False
            sel.unregister(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORT)
            sock.close()
            now = time.monotonic()
            if ok:
                latencies.append(now - state[0])
                completions.append(time.time())
            else:
                failures += 1
            if now < deadline:
                while not begin():
                    failures += 1
    results.put((latencies, completions, failures))


def run_load(port, concurrency, duration, processes):
    """Closed-loop sessions from several processes; merged results."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    start_at = time.time() + 0.2
    share = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    procs = [ctx.Process(target=_drive, args=(port, c, duration, start_at, results))
             for c in share if c]
    for p in procs:
        p.start()
    latencies, completions, failures = [], [], 0
    for _ in procs:
        lat, comp, fail = results.get()
        latencies += lat
        completions += comp
        failures += fail
    for p in procs:
        p.join()
    return start_at, latencies, sorted(completions), failures


# ---------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------


class Server:
    """The echo server, on its own or behind socketprotector in one mode."""

    def __init__(self, mode, delay_file):
        self.mode = mode
        self.port = free_port()
        env = dict(os.environ, BENCH_READY_DELAY_FILE=delay_file)
        argv = MODES[mode](self.port, [sys.executable, SERVER, str(self.port)])
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 10
        while not self._answers():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise SystemExit(f"bench: {mode} server did not start")
            time.sleep(0.01)

    def _answers(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(PAYLOAD)
                return s.recv(4096) == PAYLOAD
        except OSError:
            return False

    @property
    def daemon_pid(self):
        return self.proc.pid if self.mode != "direct" else None

    def cpu_seconds(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def peak_rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # children of a stopped daemon are in their own process groups
        for pid in _session_members(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _session_members(sid):
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[3]) == sid:
                        members.append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    return members


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_interpreter_rss_kib():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return usage.ru_maxrss


# ---------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------


def summarize(start_at, latencies, completions, failures, duration):
    lat = sorted(latencies)

    def pct(p):
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3 if lat else float("nan")
    edges = [start_at] + completions + [start_at + duration]
    gap = max(b - a for a, b in zip(edges, edges[1:]))
    return {"sessions": len(lat), "failures": failures, "per_second": len(lat) / duration,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": lat[-1] * 1e3 if lat else 0,
            "longest_gap_ms": gap * 1e3}


def measure(server, concurrency, duration, during=None):
    """One load run against a server; `during(server)` runs alongside it."""
    processes = 1 if concurrency == 1 else 2
    cpu = server.cpu_seconds() if server.daemon_pid else 0
    helper = None
    if during is not None:
        helper = multiprocessing.get_context("fork").Process(target=during, args=(server,))
        helper.start()
    start_at, latencies, completions, failures = run_load(server.port, concurrency, duration,
                                                          processes)
    if helper is not None:
        helper.join()
    result = summarize(start_at, latencies, completions, failures, duration)
    if server.daemon_pid:
        used = server.cpu_seconds() - cpu
        result["daemon_cpu_us_per_conn"] = used / max(1, result["sessions"]) * 1e6
    return result


def sighup_storm(duration):
    def storm(server):
        deadline = time.monotonic() + duration
        time.sleep(0.2)
        while time.monotonic() < deadline:
            os.kill(server.daemon_pid, signal.SIGHUP)
            time.sleep(0.1)
    return storm


def slow_restart(delay_file):
    def restart(server):
        time.sleep(0.7)
        with open(delay_file, "w") as f:
            f.write("1.0")
        os.kill(server.daemon_pid, signal.SIGHUP)
    return restart


def median_run(runs):
    return sorted(runs, key=lambda r: r["per_second"])[len(runs) // 2]


def run_all(args):
    tmp = tempfile.mkdtemp(prefix="sp-bench-")
    delay_file = os.path.join(tmp, "ready-delay")
    results = {"python": sys.version.split()[0], "cpus": os.cpu_count(),
               "duration_s": args.duration, "repeat": args.repeat,
               "bare_python_rss_kib": bare_interpreter_rss_kib(), "steady": {}, "restarts": {}}
    servers = {mode: Server(mode, delay_file) for mode in MODES}
    try:
        for concurrency in args.concurrency:
            runs = {mode: [] for mode in MODES}
            for i in range(args.repeat):
                # Each round in a different order: no configuration always goes first.
                for mode in list(MODES)[i % len(MODES):] + list(MODES)[:i % len(MODES)]:
                    runs[mode].append(measure(servers[mode], concurrency, args.duration))
                    progress(f"c={concurrency} {mode}: {runs[mode][-1]['per_second']:.0f}/s")
            results["steady"][concurrency] = {mode: median_run(r) for mode, r in runs.items()}
        for mode in ("forward", "listener"):
            results[f"{mode}_daemon_peak_rss_kib"] = servers[mode].peak_rss_kib()
        for mode in ("forward", "listener") if args.restarts else ():
            server = servers[mode]
            storm = measure(server, 32, args.duration, sighup_storm(args.duration))
            progress(f"SIGHUP storm {mode}: {storm['per_second']:.0f}/s")
            slow = measure(server, 32, max(args.duration, 2.5), slow_restart(delay_file))
            progress(f"slow restart {mode}: {slow['per_second']:.0f}/s")
            os.unlink(delay_file)
            results["restarts"][mode] = {"sighup_every_100ms": storm, "restart_ready_after_1s": slow}
    finally:
        for server in servers.values():
            server.stop()
        if os.path.exists(delay_file):
            os.unlink(delay_file)
        os.rmdir(tmp)
    return results


def progress(text):
    print(f"  {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def report(r):
    lines = [f"Python {r['python']}, {r['cpus']} CPUs, {r['duration_s']:g} s runs, "
             f"median of {r['repeat']}", ""]
    head = (f"{'load':<18}{'mode':<10}{'sessions/s':>11}{'ratio':>7}{'p50 ms':>8}"
            f"{'p99 ms':>8}{'max ms':>8}{'daemon us/conn':>15}{'fail':>6}")
    lines += [head, "-" * len(head)]
    for conc, by_mode in r["steady"].items():
        base = by_mode["direct"]["per_second"]
        for mode, m in by_mode.items():
            lines.append(_row(f"steady c={conc}", mode, m, m["per_second"] / base))
    for mode, by_load in r["restarts"].items():
        steady = r["steady"][32][mode]
        for load, m in by_load.items():
            label = {"sighup_every_100ms": "SIGHUP/100ms c=32",
                     "restart_ready_after_1s": "1 s restart c=32"}[load]
            lines.append(_row(label, mode, m, m["per_second"] / steady["per_second"],
                              f"  p99 x{m['p99_ms'] / steady['p99_ms']:.2f} of steady, "
                              f"longest gap {m['longest_gap_ms']:.0f} ms"))
    bare = r["bare_python_rss_kib"]
    lines += ["", "ratio: sessions/s over the same load on its own (restart rows: over the "
                  "same mode's steady c=32)",
              "bare hop: bench/bare_forwarder.py, accept and pass on, nothing else: "
              "what the extra hop alone costs here",
              f"daemon peak RSS: forward {r['forward_daemon_peak_rss_kib'] / 1024:.1f} MiB "
              f"(x{r['forward_daemon_peak_rss_kib'] / bare:.2f}), listener "
              f"{r['listener_daemon_peak_rss_kib'] / 1024:.1f} MiB "
              f"(x{r['listener_daemon_peak_rss_kib'] / bare:.2f}) of a bare python3 -c pass "
              f"({bare / 1024:.1f} MiB)"]
    return "\n".join(lines)


def _row(load, mode, m, ratio, extra=""):
    cpu = m.get("daemon_cpu_us_per_conn")
    return (f"{load:<18}{mode:<10}{m['per_second']:>11.0f}{ratio:>7.2f}{m['p50_ms']:>8.2f}"
            f"{m['p99_ms']:>8.2f}{m['max_ms']:>8.1f}"
            f"{(f'{cpu:.1f}' if cpu is not None else '-'):>15}{m['failures']:>6}{extra}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per run (2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration (3)")
    parser.add_argument("--concurrency", type=lambda text: [int(c) for c in text.split(",")],
                        default=[1, 32], help="comma-separated concurrencies (1,32)")
    parser.add_argument("--no-restarts", dest="restarts", action="store_false",
                        help="skip the SIGHUP storm and slow-restart runs")
    args = parser.parse_args()
    if args.restarts and 32 not in args.concurrency:
        parser.error("the restart runs are compared with concurrency 32: include it, "
                     "or pass --no-restarts")
    results = run_all(args)
    print(json.dumps(results, indent=2) if args.json else report(results))


if __name__ == "__main__":
    main()
