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
import shutil
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
TIMED_OUT = 5.0         # seconds: an open-loop session still unanswered then has failed
CLK_TCK = os.sysconf("SC_CLK_TCK")

# How each configuration starts the server (its argv), by name; `options`
# are extra socketprotector options (--workers).
MODES = {
    "direct": lambda port, server, options: server,
    "forward": lambda port, server, options: [
        sys.executable, DAEMON, "-f", "--bind", "127.0.0.1", *options, str(port), "--", *server],
    "listener": lambda port, server, options: [
        sys.executable, DAEMON, "-f", "--bind", "127.0.0.1", "--handoff", "listener", *options,
        str(port), "--", *server],
    # A reference, not socketprotector: the extra hop and nothing else.
    "bare hop": lambda port, server, options: [sys.executable, BARE, str(port), *server],
}
# The C++ original, a reference row when its binary is given (--original),
# and bare_forwarder.c, the hop in compiled code, when a C compiler is there.
ORIGINAL = "C++ orig"
BARE_C = "bare hop C"
# The workers rows: CPU-bound requests, one worker against two, at c=32.
WORKER_CONFIGS = [("direct", 1), ("forward", 1), ("forward", 2), ("listener", 1),
                  ("listener", 2)]
# The chaos rows: a worker SIGKILLed every 250 ms under open-loop load.
CHAOS_CONFIGS = [("forward", 1), ("listener", 1), ("forward", 3), ("listener", 3)]


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


def _drive_open(port, rate, duration, start_at, results):
    """One open-loop load process: a session begins every 1/rate s, however the
    earlier ones fare; one that takes longer than TIMED_OUT s counts as failed."""
    sel = selectors.DefaultSelector()
    latencies, failures, timeouts = [], 0, 0
    while time.time() < start_at:
        time.sleep(0.001)
    now = next_start = time.monotonic()
    deadline = now + duration
    while now < deadline or sel.get_map():
        while now < deadline and now >= next_start:
            sock = socket.socket()
            sock.setblocking(False)
            if sock.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS):
                sel.register(sock, selectors.EVENT_WRITE, [next_start, b""])
            else:
                sock.close()
                failures += 1
            next_start += 1.0 / rate
        wait = max(0.0, next_start - now) if now < deadline else 0.05
        for key, mask in sel.select(wait):
            sock, state = key.fileobj, key.data
            try:
                if mask & selectors.EVENT_WRITE:
                    sock.send(PAYLOAD)
                    sel.modify(sock, selectors.EVENT_READ, state)
                    continue
                chunk = sock.recv(4096)
                state[1] += chunk
                if chunk and len(state[1]) < len(PAYLOAD):
                    continue
                ok = state[1] == PAYLOAD
            except OSError:
                ok = False
            sel.unregister(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORT)
            sock.close()
            if ok:
                latencies.append(time.monotonic() - state[0])
            else:
                failures += 1
        now = time.monotonic()
        for key in list(sel.get_map().values()):
            if now - key.data[0] > TIMED_OUT:
                sel.unregister(key.fileobj)
                key.fileobj.close()
                timeouts += 1
    results.put((latencies, failures, timeouts))


def run_open_load(port, rate, duration, processes=2):
    """Open-loop sessions at `rate` per second in all, from several processes."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    start_at = time.time() + 0.2
    procs = [ctx.Process(target=_drive_open, args=(port, rate / processes, duration,
                                                   start_at, results))
             for _ in range(processes)]
    for p in procs:
        p.start()
    latencies, failures, timeouts = [], 0, 0
    for _ in procs:
        lat, fail, late = results.get()
        latencies += lat
        failures += fail
        timeouts += late
    for p in procs:
        p.join()
    return sorted(latencies), failures, timeouts


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

    def __init__(self, mode, delay_file, workers=1, work_us=0, original=None, bare_c=None):
        self.mode = mode
        self.workers = workers
        self.port = free_port()
        env = dict(os.environ, BENCH_READY_DELAY_FILE=delay_file, BENCH_WORK_US=str(work_us))
        server = [sys.executable, SERVER, str(self.port)]
        if mode == ORIGINAL:
            env["BENCH_PROTOCOL"] = "original"
            argv = [original, "-f", str(self.port), "--", *server]
        elif mode == BARE_C:
            argv = [bare_c, str(self.port), *server]
        else:
            argv = MODES[mode](self.port, server,
                               ["--workers", str(workers)] if workers > 1 else [])
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

    def workers_pids(self):
        """The daemon's children that serve (all of them: no restart runs here)."""
        return [pid for pid in _session_members(self.proc.pid) if pid != self.proc.pid
                and _parent(pid) == self.proc.pid]

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


def _parent(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_bare_c(where):
    """bare_forwarder.c compiled into `where`, or None without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        progress("no C compiler: no 'bare hop C' row")
        return None
    binary = os.path.join(where, "bare_forwarder")
    subprocess.run([compiler, "-O2", "-o", binary, os.path.join(HERE, "bare_forwarder.c")],
                   check=True)
    return binary


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


def measure(server, concurrency, duration, during=None, processes=None):
    """One load run against a server; `during(server)` runs alongside it."""
    processes = processes or (1 if concurrency == 1 else 2)
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
        result["daemon_cpu_share"] = used / duration
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


def kill_a_worker_every(interval, duration):
    def killer(server):
        deadline = time.monotonic() + duration
        turn = 0
        time.sleep(0.3)
        while time.monotonic() < deadline:
            workers = sorted(server.workers_pids())
            if workers:
                try:
                    os.kill(workers[turn % len(workers)], signal.SIGKILL)
                except ProcessLookupError:
                    pass
                turn += 1
            time.sleep(interval)
    return killer


def measure_open(server, rate, duration, during):
    """Open-loop load while `during(server)` runs alongside it."""
    helper = multiprocessing.get_context("fork").Process(target=during, args=(server,))
    helper.start()
    latencies, failures, timeouts = run_open_load(server.port, rate, duration)
    helper.join()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3
    return {"sessions": len(latencies), "failures": failures, "timeouts": timeouts,
            "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": latencies[-1] * 1e3}


def run_workers(args, delay_file):
    """CPU-bound requests (--work-us each) through one worker and two, and the
    forwarding ceiling: the most it forwards to two workers that do no work."""
    servers = {key: Server(key[0], delay_file, workers=key[1], work_us=args.work_us)
               for key in WORKER_CONFIGS}
    runs = {key: [] for key in servers}
    try:
        for i in range(args.repeat):
            order = WORKER_CONFIGS[i % len(WORKER_CONFIGS):] + WORKER_CONFIGS[:i % len(
                WORKER_CONFIGS)]
            for key in order:
                runs[key].append(measure(servers[key], 32, args.duration))
                progress(f"{args.work_us:g} us/request, {key[0]} x{key[1]}: "
                         f"{runs[key][-1]['per_second']:.0f}/s")
    finally:
        for server in servers.values():
            server.stop()
    result = {f"{mode} x{n}": median_run(runs[(mode, n)]) for mode, n in WORKER_CONFIGS}
    ceiling = Server("forward", delay_file, workers=2)
    try:
        tries = [measure(ceiling, 64, args.duration, processes=3) for _ in range(args.repeat)]
    finally:
        ceiling.stop()
    result["ceiling"] = median_run(tries)
    progress(f"forwarding ceiling: {result['ceiling']['per_second']:.0f}/s")
    return result


def run_chaos(args, delay_file):
    """A worker SIGKILLed every 250 ms under open-loop load (--chaos-rate)."""
    result = {}
    for mode, n in CHAOS_CONFIGS:
        server = Server(mode, delay_file, workers=n)
        try:
            m = measure_open(server, args.chaos_rate, max(args.duration, 3.0),
                             kill_a_worker_every(0.25, max(args.duration, 3.0)))
        finally:
            server.stop()
        result[f"{mode} x{n}"] = m
        progress(f"chaos {mode} x{n}: {m['sessions']} sessions, {m['failures']} failed, "
                 f"max {m['max_ms']:.0f} ms")
    return result


def median_run(runs):
    return sorted(runs, key=lambda r: r["per_second"])[len(runs) // 2]


def run_all(args):
    tmp = tempfile.mkdtemp(prefix="sp-bench-")
    delay_file = os.path.join(tmp, "ready-delay")
    results = {"python": sys.version.split()[0], "cpus": os.cpu_count(),
               "duration_s": args.duration, "repeat": args.repeat,
               "bare_python_rss_kib": bare_interpreter_rss_kib(), "steady": {}, "restarts": {}}
    if args.workers:
        results["workers"] = run_workers(args, delay_file)
        results["work_us"] = args.work_us
    if args.chaos:
        results["chaos"] = run_chaos(args, delay_file)
        results["chaos_rate"] = args.chaos_rate
    if not args.steady:
        shutil.rmtree(tmp, ignore_errors=True)
        return results
    bare_c = build_bare_c(tmp)
    modes = [*MODES, *([BARE_C] if bare_c else []), *([ORIGINAL] if args.original else [])]
    servers = {mode: Server(mode, delay_file, original=args.original, bare_c=bare_c)
               for mode in modes}
    try:
        for concurrency in args.concurrency:
            runs = {mode: [] for mode in modes}
            for i in range(args.repeat):
                # Each round in a different order: no configuration always goes first.
                for mode in modes[i % len(modes):] + modes[:i % len(modes)]:
                    runs[mode].append(measure(servers[mode], concurrency, args.duration))
                    progress(f"c={concurrency} {mode}: {runs[mode][-1]['per_second']:.0f}/s")
            results["steady"][concurrency] = by_mode = {mode: median_run(r)
                                                        for mode, r in runs.items()}
            # Ranges over the rounds: each round's ratio is against that round's direct run.
            for mode, m in by_mode.items():
                ratios = [a["per_second"] / b["per_second"]
                          for a, b in zip(runs[mode], runs["direct"])]
                m["ratio_range"] = [min(ratios), max(ratios)]
                cpus = [r["daemon_cpu_us_per_conn"] for r in runs[mode]
                        if "daemon_cpu_us_per_conn" in r]
                if cpus:
                    m["cpu_range"] = [min(cpus), max(cpus)]
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
        shutil.rmtree(tmp, ignore_errors=True)
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
    if "workers" in r:
        lines += _workers_report(r, head)
    if "chaos" in r:
        lines += _chaos_report(r)
    if not r["steady"]:
        return "\n".join(lines)
    lines += [head, "-" * len(head)]
    for conc, by_mode in r["steady"].items():
        base = by_mode["direct"]["per_second"]
        for mode, m in by_mode.items():
            ranges = ""
            if mode != "direct" and len(m.get("ratio_range", ())) == 2:
                ranges = "  ratio {:.2f}-{:.2f}".format(*m["ratio_range"])
                if "cpu_range" in m:
                    ranges += ", us/conn {:.1f}-{:.1f}".format(*m["cpu_range"])
            lines.append(_row(f"steady c={conc}", mode, m, m["per_second"] / base, ranges))
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
                  "same mode's steady c=32); after each steady row, the range over the rounds",
              "bare hop: bench/bare_forwarder.py, accept and pass on, nothing else: "
              "what the extra hop alone costs here (bare hop C: the same in C)",
              "C++ orig: the original (--original), its child side in echo_server.py"
              if ORIGINAL in r["steady"].get(32, r["steady"].get(1, {})) else
              "C++ orig: not run (give its binary with --original or $SOCKETPROTECTOR_ORIGINAL)",
              f"daemon peak RSS: forward {r['forward_daemon_peak_rss_kib'] / 1024:.1f} MiB "
              f"(x{r['forward_daemon_peak_rss_kib'] / bare:.2f}), listener "
              f"{r['listener_daemon_peak_rss_kib'] / 1024:.1f} MiB "
              f"(x{r['listener_daemon_peak_rss_kib'] / bare:.2f}) of a bare python3 -c pass "
              f"({bare / 1024:.1f} MiB)"]
    return "\n".join(lines)


def _workers_report(r, head):
    w = r["workers"]
    label = f"{r['work_us']:g}us c=32"
    lines = [head, "-" * len(head)]
    for name, m in w.items():
        if name == "ceiling":
            continue
        mode, n = name.split(" x")
        base = w[f"{mode} x1"]["per_second"] if mode != "direct" else m["per_second"]
        lines.append(_row(label, f"{mode} x{n}", m, m["per_second"] / base))
    c = w["ceiling"]
    lines.append(_row("no work c=64", "forward x2", c, 1.0,
                      f"  daemon busy {c['daemon_cpu_share'] * 100:.0f}% of a CPU: "
                      f"at most ~{1e6 / c['daemon_cpu_us_per_conn']:.0f} conn/s"))
    lines += ["", "workers rows: ratio of N workers over one, same mode (direct: one "
                  "process, the baseline)", ""]
    return lines


def _chaos_report(r):
    head = (f"{'chaos':<28}{'sessions':>9}{'fail':>6}{'timeouts':>9}{'p50 ms':>8}"
            f"{'p99 ms':>8}{'max ms':>8}")
    lines = [head, "-" * len(head)]
    for name, m in r["chaos"].items():
        lines.append(f"{'kill/250ms ' + name:<28}{m['sessions']:>9}{m['failures']:>6}"
                     f"{m['timeouts']:>9}{m['p50_ms']:>8.2f}{m['p99_ms']:>8.2f}"
                     f"{m['max_ms']:>8.1f}")
    lines += ["", f"chaos rows: open-loop {r['chaos_rate']:g} sessions/s; a worker "
                  "SIGKILLed every 250 ms (in turn); fail: sessions the killed worker had "
                  f"taken (or refused); timeouts: unanswered after {TIMED_OUT:g} s", ""]
    return lines


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
    parser.add_argument("--no-steady", dest="steady", action="store_false",
                        help="skip the steady and restart rows (the one-worker echo server)")
    parser.add_argument("--no-workers", dest="workers", action="store_false",
                        help="skip the CPU-bound one-against-two-workers rows and the ceiling")
    parser.add_argument("--no-chaos", dest="chaos", action="store_false",
                        help="skip the kill-a-worker-every-250-ms rows")
    parser.add_argument("--original", metavar="PATH",
                        default=os.environ.get("SOCKETPROTECTOR_ORIGINAL"),
                        help="the C++ original's binary (github.com/kdt3rd/SocketProtector, "
                             "built outside this project), for a reference row "
                             "(default: $SOCKETPROTECTOR_ORIGINAL; without it, no such row)")
    parser.add_argument("--work-us", type=float, default=300,
                        help="workers rows: microseconds of Python each request burns (300)")
    parser.add_argument("--chaos-rate", type=float, default=2000,
                        help="chaos rows: open-loop sessions per second (2000)")
    args = parser.parse_args()
    if args.restarts and 32 not in args.concurrency:
        parser.error("the restart runs are compared with concurrency 32: include it, "
                     "or pass --no-restarts")
    results = run_all(args)
    print(json.dumps(results, indent=2) if args.json else report(results))


if __name__ == "__main__":
    main()
