#!/usr/bin/env python3
"""Compare multiconn's server with peer servers on framed echo and raw echo.

    pip install -e '.[bench]' && python benchmarks/run.py     # 3 rounds: 12 minutes or more
    python benchmarks/run.py --quick --rounds 1                # smoke test: 2 minutes or more
    python benchmarks/run.py --servers multiconn,asyncio_protocol --scenarios raw-echo-100x64

Every run starts a fresh server, waits for its port, warms it up with one
short `multiconn bench`, then measures with a second one (`--warmup 0`),
reading the server's CPU time from /proc/PID/stat just before and just after
that second run.  The server is pinned to one CPU and the load generator to
another when the machine has two or more.  Rounds are interleaved: each round
runs every scenario on every server, the server order rotated by one per
round, so that drift and other tenants' load hit all servers alike.

Writes OUT/benchmarks.md (the report, also printed), OUT/benchmarks.png (the
chart) and OUT/benchmarks.json (every run).  Exit status 1 if any run failed.
"""

import argparse
import datetime
import importlib
import json
import os
import platform
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from benchutil import QUIET_BUSY_PCT, cpu_model, fmt, free_port, git_revision, median, per_cpu_busy, wait_for_quiet

try:
    from multiconn.procstats import process_cpu_seconds, process_peak_rss_bytes
except ImportError:
    raise SystemExit("multiconn does not import: install the project first: pip install -e '.[bench]'") from None

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, "peers")
HOST = "127.0.0.1"
BENCH = [sys.executable, "-m", "multiconn", "bench"]  # the load generator
TICK = os.sysconf("SC_CLK_TCK")

QUIET_MAX_WAIT = 20.0   # ...for at most this many seconds
START_TIMEOUT = 20.0    # a server must accept connections within this
STOP_GRACE = 5.0        # SIGTERM, then SIGKILL after this


@dataclass(frozen=True)
class Scenario:
    name: str
    mode: str          # "framed" or "raw"
    connections: int
    size: int          # payload bytes per request
    pipeline: int = 1
    metric: str = "rps"  # what the throughput tables show: "rps" or "mbps"


SCENARIOS = [
    Scenario("framed-pingpong-100x1k", "framed", 100, 1024),
    Scenario("framed-pipelined-100x64-p16", "framed", 100, 64, pipeline=16),
    Scenario("framed-conns-1000x64", "framed", 1000, 64),
    Scenario("raw-echo-100x64", "raw", 100, 64),
    Scenario("framed-bulk-4x1m", "framed", 4, 1 << 20, metric="mbps"),
]


@dataclass(frozen=True)
class Server:
    name: str
    argv: tuple        # with {mode}, {app} and {port} placeholders
    requires: str = ""  # a module that must import, or the server is skipped
    what: str = ""

    def command(self, mode, port):
        app = "echo" if mode == "framed" else "raw-echo"
        return [sys.executable] + [a.format(mode=mode, app=app, port=port) for a in self.argv]


def _peer(script, *extra):
    return (os.path.join(PEERS, script), "--port", "{port}", "--mode", "{mode}") + extra


SERVERS = [
    Server("multiconn", ("-m", "multiconn", "serve", "--port", "{port}", "--app", "{app}", "--log-level", "warning"),
           what="this project: `multiconn serve --app echo|raw-echo`"),
    Server("asyncio_streams", _peer("asyncio_streams.py"),
           what="asyncio `start_server`, `readexactly` + `write` + `drain` per frame"),
    Server("asyncio_protocol", _peer("asyncio_protocol.py"),
           what="`asyncio.Protocol` + incremental decoder, pause/resume reading on backpressure"),
    Server("uvloop_protocol", _peer("asyncio_protocol.py", "--loop", "uvloop"), requires="uvloop",
           what="the asyncio_protocol peer on uvloop's event loop"),
    Server("trio", _peer("trio_echo.py"), requires="trio",
           what="`trio.serve_tcp`, `receive_some` + decoder + `send_all`"),
    Server("threads", _peer("threads.py"),
           what="`socketserver.ThreadingTCPServer`, a thread per connection, blocking reads + `sendall`"),
]


def log(message):
    print(message, file=sys.stderr, flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warmup seconds per run (default 1)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 s measured after 0.5 s warmup")
    parser.add_argument("--servers", help="comma list (default all): " + ", ".join(s.name for s in SERVERS))
    parser.add_argument("--scenarios", help="comma list (default all): " + ", ".join(s.name for s in SCENARIOS))
    parser.add_argument("--baseline", default="multiconn", help="the server the ratios are to (default multiconn)")
    parser.add_argument("--processes", type=int, default=1,
                        help="load generator processes (default 1; they share one pinned CPU)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"),
                        help="folder for benchmarks.md/.png/.json (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 1.0, 0.5
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--rounds must be >= 1, --duration > 0, --warmup >= 0")

    def pick(text, known, what):
        if not text:
            return list(known)
        by_name = {item.name: item for item in known}
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            parser.error(f"unknown {what} {', '.join(unknown)}; known: {', '.join(by_name)}")
        return [by_name[n] for n in names]

    args.servers = pick(args.servers, SERVERS, "server")
    args.scenarios = pick(args.scenarios, SCENARIOS, "scenario")
    return args


# --- the machine ----------------------------------------------------------------------------------

def raise_nofile_limit():
    """1,000 connections need more descriptors than the usual soft limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def server_cpu_seconds(pid):
    """utime + stime of the server (all its threads); it must still be there."""
    seconds = process_cpu_seconds(pid)
    if seconds is None:
        raise RuntimeError(f"the server (pid {pid}) is gone: no /proc/{pid}/stat")
    return seconds


def peak_rss_mib(pid):
    peak = process_peak_rss_bytes(pid)
    return peak / (1024 * 1024) if peak is not None else None


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- one run --------------------------------------------------------------------------------------


def pinned(cpu):
    """A preexec_fn that pins the child (and every thread it will start) to cpu."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def tail(path, limit=400):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def stop(proc):
    """SIGTERM the process group we created for proc, SIGKILL it if it lingers."""
    if proc is None:
        return
    for sig, grace in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # stragglers of the group, if the leader left any
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def start_server(server, mode, cpu, stderr_path):
    port = free_port()
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(server.command(mode, port), cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                preexec_fn=pinned(cpu))
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with status {proc.returncode} before listening: {tail(stderr_path)}")
            try:
                with socket.create_connection((HOST, port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not listening on port {port} after {START_TIMEOUT:g} s") from None
                time.sleep(0.05)
    except BaseException:
        stop(proc)
        raise
    time.sleep(0.1)  # let it see the probe connection close
    return proc, port


def run_bench(args, scenario, port, cpu, duration, warmup):
    """Run the load generator once; return (result dict or None, error text or None)."""
    cmd = BENCH + [
        "--host", HOST, "--port", str(port), "--connections", str(scenario.connections),
        "--size", str(scenario.size), "--pipeline", str(scenario.pipeline), "--duration", f"{duration:g}",
        "--warmup", f"{warmup:g}", "--mode", scenario.mode, "--processes", str(args.processes), "--json"]
    timeout = duration + warmup + 60
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True, preexec_fn=pinned(cpu))
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None, f"load generator still running after {timeout:g} s"
        finally:
            stop(proc)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
    result = None
    for line in reversed(stdout.strip().splitlines()):
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if isinstance(result, dict):
            break
        result = None
    if proc.returncode != 0 or result is None:
        return result, f"load generator exit status {proc.returncode}: {stderr.strip()[-300:] or stdout[-300:]}"
    return result, None


def run_one(args, server, scenario, cpus, quiet_cpus):
    """Fresh server, warmup, measured window.  Returns a record; never leaves the server running."""
    server_cpu, load_cpu = cpus
    record = {"server": server.name, "scenario": scenario.name, "started": time.time(),
              "busy_before_pct": round(wait_for_quiet(quiet_cpus, QUIET_MAX_WAIT), 1)}
    with tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log", delete=False) as f:
        stderr_path = f.name
    proc = None
    try:
        proc, port = start_server(server, scenario.mode, server_cpu, stderr_path)
        if args.warmup > 0:
            _, error = run_bench(args, scenario, port, load_cpu, args.warmup, 0)
            if error:
                raise RuntimeError(f"warmup: {error}")
        cpu_before, load_before, busy_before = server_cpu_seconds(proc.pid), children_cpu_seconds(), per_cpu_busy()
        t0 = time.monotonic()
        result, error = run_bench(args, scenario, port, load_cpu, args.duration, 0)
        wall = time.monotonic() - t0
        cpu_after, load_after, busy_after = server_cpu_seconds(proc.pid), children_cpu_seconds(), per_cpu_busy()
        record["peak_rss_mib"] = peak_rss_mib(proc.pid)
        if result:
            record.update(result)
        if error:
            raise RuntimeError(error)
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} during the run")
        server_s, load_s = cpu_after - cpu_before, load_after - load_before
        requests, window = result.get("requests") or 0, result.get("duration_s") or args.duration
        record.update(
            wall_s=round(wall, 3), server_cpu_s=round(server_s, 3), load_cpu_s=round(load_s, 3),
            # per second of the measured window: nearly all of the work falls inside it
            server_cpu_pct=round(100 * server_s / window, 1), load_cpu_pct=round(100 * load_s / window, 1),
            cpu_us_per_request=round(1e6 * server_s / requests, 2) if requests else None)
        if server_cpu is not None:  # busy time on the two CPUs that was neither the server's nor the load's
            for key, cpu, ours in (("other_load_server_cpu_pct", server_cpu, server_s),
                                   ("other_load_load_cpu_pct", load_cpu, load_s)):
                other = (busy_after[cpu] - busy_before[cpu]) - ours
                record[key] = round(max(0.0, 100 * other / wall), 1)
    except (RuntimeError, OSError) as exc:
        record["error"] = str(exc)
        if proc is not None and tail(stderr_path):
            record["server_stderr"] = tail(stderr_path)
    finally:
        stop(proc)
        os.unlink(stderr_path)
    return record


# --- the report -----------------------------------------------------------------------------------

def summarize(args, records):
    """{(server, scenario): {...medians...}} and the paired ratios to the baseline."""
    cells = {}
    for server in args.servers:
        for scenario in args.scenarios:
            runs = [r for r in records if r["server"] == server.name and r["scenario"] == scenario.name]
            ok = [r for r in runs if "error" not in r]
            cell = {
                "runs": len(runs), "failed": len(runs) - len(ok),
                "errors": sum(r.get("errors") or 0 for r in runs),
                "throughput": median(r.get(scenario.metric) for r in ok),
                "all_throughput": [r.get(scenario.metric) for r in ok],
                "cpu_us": median(r.get("cpu_us_per_request") for r in ok),
                "p99": median((r.get("latency_us") or {}).get("p99") for r in ok),
                "server_cpu_pct": median(r.get("server_cpu_pct") for r in ok),
                "load_cpu_pct": median(r.get("load_cpu_pct") for r in ok),
            }
            # ratio to the baseline: the median of per-round ratios (the two runs were close in time)
            base = {r["round"]: r.get(scenario.metric) for r in records
                    if r["server"] == args.baseline and r["scenario"] == scenario.name and "error" not in r}
            cell["ratio"] = median(r[scenario.metric] / base[r["round"]] for r in ok
                                   if base.get(r["round"]) and r.get(scenario.metric) is not None)
            cells[(server.name, scenario.name)] = cell
    return cells


def build_report(args, meta, records, cells):
    scenarios, servers = args.scenarios, args.servers
    L = ["# multiconn benchmarks: echo servers compared", ""]
    L += [f"- Date: {meta['date']} ({meta['elapsed_min']:.0f} min)",
          f"- Machine: {meta['cpus']} CPUs ({meta['cpu_model']}), {meta['os']}; shared with other tenants, "
          "so the numbers are comparable only within this report.",
          f"- {meta['pinning']}",
          f"- Python {meta['python']}; multiconn {meta['multiconn']} at git {meta['git']}; "
          + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
          f"- Load generator: `multiconn bench` ({args.processes} process{'es' if args.processes > 1 else ''}), "
          "loopback 127.0.0.1 only.",
          f"- {args.rounds} interleaved round{'s' if args.rounds > 1 else ''}; each run: fresh server, "
          f"{args.warmup:g} s warmup, then {args.duration:g} s measured; server order rotated each round.",
          f"- Command: `{meta['command']}`"]
    L += [f"- {note}" for note in meta["notes"]]
    L += ["", "Servers (all answer each frame with a frame of the same content-type, content-encoding, "
          "content and id; `raw` scenarios echo bytes as they arrive):", ""]
    L += [f"- **{s.name}**: {s.what}" for s in servers]
    L += ["", "Scenarios: `framed`/`raw`, connections × payload size, requests in flight per connection "
          "(pipeline). Throughput is requests (round trips) per second, except the bulk scenario in MB/s "
          "of echoed payload (10^6 bytes/s, one direction).", ""]

    def table(title, explain, value):
        L.extend([f"## {title}", ""])
        if explain:
            L.extend([explain, ""])
        L.append("| server | " + " | ".join(s.name for s in scenarios) + " |")
        L.append("|---|" + "---:|" * len(scenarios))
        for server in servers:
            row = []
            for scenario in scenarios:
                cell = cells[(server.name, scenario.name)]
                row.append("FAILED" if cell["runs"] and cell["failed"] == cell["runs"] else value(cell, scenario))
            L.append(f"| {server.name} | " + " | ".join(row) + " |")
        L.append("")

    table("Throughput (median req/s; MB/s for bulk)", "",
          lambda c, sc: fmt(c["throughput"]))
    table(f"Throughput ratio to {args.baseline}",
          f"Median over rounds of (server ÷ {args.baseline}) in the same round; above 1 is faster than "
          f"{args.baseline}.", lambda c, sc: "–" if c["ratio"] is None else f"{c['ratio']:.2f}")
    table("Server CPU µs per request (median)",
          "The server process's user + system CPU time during the measured run (from /proc/PID/stat) "
          "divided by the requests answered. Lower is better; unlike throughput it does not depend on "
          "whether the server or the load generator is the bottleneck.",
          lambda c, sc: fmt(c["cpu_us"], 1))
    table("Latency p99 (median, µs)",
          "From the moment the load generator queues a request to its complete answer.",
          lambda c, sc: fmt(c["p99"]))
    table("CPU busy %: server / load generator (median; 100 = one core)",
          "CPU seconds used during the measured run ÷ its measured seconds (the load generator's "
          "figure includes its start-up, about 0.15 s of CPU). Near 100 for the server: the server is "
          "the bottleneck. Near 100 for the load generator (a Python program on one core): it limits "
          "the throughput, and CPU per request is the fairer comparison.",
          lambda c, sc: f"{fmt(c['server_cpu_pct'])} / {fmt(c['load_cpu_pct'])}")
    table("Errors", "Response errors counted by the load generator (summed over rounds), and failed runs.",
          lambda c, sc: str(c["errors"]) + (f" ({c['failed']} of {c['runs']} runs failed)" if c["failed"] else ""))

    ok = [r for r in records if "error" not in r]
    other0 = [r["other_load_server_cpu_pct"] for r in ok if "other_load_server_cpu_pct" in r]
    other1 = [r["other_load_load_cpu_pct"] for r in ok if "other_load_load_cpu_pct" in r]
    spreads = []
    for (server, scenario), cell in cells.items():
        values = cell["all_throughput"]
        if len(values) > 1 and median(values):
            spreads.append((max(values) - min(values)) / median(values))
    L.extend(["## Noise", ""])
    if spreads:
        L.append(f"- Spread of throughput across rounds ((max − min) ÷ median): median {100 * median(spreads):.0f}%, "
                 f"worst {100 * max(spreads):.0f}%.")
    if other0:
        L.append(f"- Other tenants' load during the measured runs: median {median(other0):.0f}% (max {max(other0):.0f}%) "
                 f"of the server's CPU, median {median(other1):.0f}% (max {max(other1):.0f}%) of the load "
                 "generator's CPU.")
    busy = [r for r in records if r.get("busy_before_pct", 0) >= QUIET_BUSY_PCT]
    if busy:
        L.append(f"- {len(busy)} of {len(records)} runs started on a busy machine (waited {QUIET_MAX_WAIT:g} s "
                 f"for the CPUs to fall below {QUIET_BUSY_PCT:g}% busy).")
    L.append("")
    failures = [r for r in records if "error" in r]
    if failures:
        L.extend(["## Failed runs", ""])
        for r in failures:
            text = r["error"].replace("\n", " ")[:300]
            if r.get("server_stderr"):
                text += " — server stderr: " + r["server_stderr"].replace("\n", " ")[-200:]
            L.append(f"- {r['server']} / {r['scenario']} / round {r['round'] + 1}: {text}")
        L.append("")
    L.extend(["Chart: `benchmarks.png`; every run: `benchmarks.json`.", ""])
    return "\n".join(L)


def plot(args, meta, cells, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    scenarios, servers = args.scenarios, args.servers
    fig, axes = plt.subplots(2, len(scenarios), figsize=(3.1 * len(scenarios) + 1, 7.2), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    xs = range(len(servers))
    for col, scenario in enumerate(scenarios):
        for row, (key, label) in enumerate((("throughput", "MB/s" if scenario.metric == "mbps" else "req/s"),
                                            ("cpu_us", "server CPU µs / request"))):
            ax = axes[row][col]
            values = [cells[(s.name, scenario.name)][key] or 0 for s in servers]
            ax.bar(xs, values, color=[colors[i % len(colors)] for i in xs])
            tops = values
            if key == "throughput":  # the spread over rounds
                lows = [min(cells[(s.name, scenario.name)]["all_throughput"] or [0]) for s in servers]
                tops = [max(cells[(s.name, scenario.name)]["all_throughput"] or [0]) for s in servers]
                ax.errorbar(xs, values, yerr=[[v - lo for v, lo in zip(values, lows)],
                                              [hi - v for v, hi in zip(values, tops)]],
                            fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
            for x, value, top in zip(xs, values, tops):  # the median, above the bar and its whisker
                if value:
                    ax.annotate(fmt(value, 1), (x, max(value, top)), xytext=(0, 3), textcoords="offset points",
                                ha="center", va="bottom", rotation=90, fontsize=6.5)
            ax.set_ylim(0, max(tops + values + [1]) * 1.35)
            ax.set_xticks(list(xs), [s.name for s in servers], rotation=55, ha="right", fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:g}"))
            ax.set_ylabel(label, fontsize=8)
            if row == 0:
                ax.set_title(scenario.name, fontsize=8.5)
    rounds = f"{args.rounds} rounds" if args.rounds > 1 else "1 round"
    fig.suptitle(f"Echo servers, median of {rounds}: throughput (higher is better, "
                 f"whiskers min–max) and server CPU per request (lower is better)\n{meta['date']}, "
                 f"{meta['cpus']} CPUs, Python {meta['python']}", fontsize=9.5)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------------

def interrupted(signum, frame):
    raise KeyboardInterrupt  # so that SIGTERM, like Ctrl-C, runs the finally blocks that stop the servers


def main(argv=None):
    args = parse_args(argv)
    command = "python benchmarks/run.py" + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    signal.signal(signal.SIGTERM, interrupted)
    notes, versions = [], {}
    for server in list(args.servers):
        if server.requires:
            try:
                versions[server.requires] = getattr(importlib.import_module(server.requires), "__version__", "?")
            except ImportError:
                notes.append(f"{server.name}: skipped, `{server.requires}` does not import "
                             f"(install it with `pip install -e '.[bench]'`).")
                args.servers.remove(server)
    if args.baseline not in [s.name for s in args.servers]:
        notes.append(f"the baseline {args.baseline} was not run, so there are no ratios.")
    probe = subprocess.run(BENCH + ["--help"], cwd=ROOT, capture_output=True, text=True)
    if probe.returncode != 0:
        raise SystemExit(f"`multiconn bench` does not run (exit status {probe.returncode}): "
                         f"{probe.stderr.strip()[-300:]}\nInstall the project first: pip install -e '.[bench]'")
    raise_nofile_limit()
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) >= 2:
        cpus = quiet_cpus = (allowed[0], allowed[1])
        pinning = f"Server pinned to CPU {cpus[0]}, load generator to CPU {cpus[1]} (sched_setaffinity)."
    else:
        cpus, quiet_cpus = (None, None), allowed
        pinning = "Not pinned: only one CPU is available, so the server and the load generator share it."
    import multiconn
    started = datetime.datetime.now().astimezone()
    meta = {"command": command, "cpus": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}", "multiconn": getattr(multiconn, "__version__", "?"),
            "git": git_revision(), "versions": versions, "pinning": pinning, "notes": notes,
            "date": started.strftime("%Y-%m-%d %H:%M %Z")}
    plan = [(rnd, scenario, server) for rnd in range(args.rounds) for scenario in args.scenarios
            for server in args.servers[rnd % len(args.servers):] + args.servers[:rnd % len(args.servers)]]
    per_run = 2.0 + args.warmup + args.duration
    log(f"{len(args.servers)} servers x {len(args.scenarios)} scenarios x {args.rounds} rounds = {len(plan)} runs, "
        f"about {len(plan) * per_run / 60:.0f} min. {pinning}")
    for note in notes:
        log("note: " + note)
    records = []
    try:
        for i, (rnd, scenario, server) in enumerate(plan, 1):
            record = run_one(args, server, scenario, cpus, quiet_cpus)
            record["round"] = rnd
            records.append(record)
            if "error" in record:
                log(f"[{i}/{len(plan)}] r{rnd + 1} {scenario.name:28} {server.name:17} FAILED: {record['error'][:300]}")
            else:
                log(f"[{i}/{len(plan)}] r{rnd + 1} {scenario.name:28} {server.name:17} "
                    f"{scenario.metric}={record.get(scenario.metric) or 0:>10,.0f} "
                    f"cpu/req={record['cpu_us_per_request'] or 0:6.1f}us "
                    f"p99={(record.get('latency_us') or {}).get('p99') or 0:>8,.0f}us "
                    f"srv={record['server_cpu_pct']:.0f}% load={record['load_cpu_pct']:.0f}% "
                    f"errors={record.get('errors')}")
    except KeyboardInterrupt:
        log("interrupted: no report written (every server was stopped)")
        return 130
    meta["elapsed_min"] = (datetime.datetime.now().astimezone() - started).total_seconds() / 60
    cells = summarize(args, records)
    report = build_report(args, meta, records, cells)
    print(report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmarks.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.out, "benchmarks.json"), "w") as f:
        json.dump({"meta": meta, "settings": {"rounds": args.rounds, "duration": args.duration,
                   "warmup": args.warmup, "processes": args.processes},
                   "runs": records}, f, indent=1)
    try:
        plot(args, meta, cells, os.path.join(args.out, "benchmarks.png"))
    except ImportError:
        log("matplotlib is not installed: no chart (pip install -e '.[bench]')")
    log(f"wrote {os.path.join(args.out, 'benchmarks.md')}, benchmarks.png, benchmarks.json")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
