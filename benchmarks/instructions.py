"""Server instructions per request, counted by callgrind: a figure noise cannot move.

On a shared machine a timing is only meaningful as a ratio measured side by
side, and light-load CPU per request wobbles by ±10 % between identical runs.
An instruction count does not: ``valgrind --tool=callgrind`` counts the
instructions the server executes in user space (the kernel's share, the same
syscalls for every server here, is not counted), and two runs of the same code
agree to about 1 %. That makes it the tool for deciding whether a change to
the per-request path is worth keeping, before the interleaved benchmarks say
what it does to the time.

Each target runs under callgrind while `multiconn bench` (in its own process,
not counted) loads it: a warm-up, then callgrind's counters are zeroed, then the
measured load, then a dump. Requests are the load generator's count.

    python benchmarks/instructions.py                      # multiconn raw and framed, 1 connection
    python benchmarks/instructions.py --connections 10 --target 'uvloop=python benchmarks/peers/asyncio_protocol.py --port {port} --mode {mode} --loop uvloop'

With ``--in-memory`` it counts instead the framed path alone, per frame:
`FramedSession.data_received` over a `multiconn.testing.MemoryTransport`,
``--pipeline`` frames of 64 bytes per read, echo answered inline, with and
without ``--metrics``' timing. No socket, no loop, no system call: decoding,
answering and encoding, which is what a pipelined request costs. Each figure
is the difference of two runs (1,000 and 4,000 reads, ``PYTHONHASHSEED=0``),
so the interpreter's start cancels out.

    python benchmarks/instructions.py --in-memory --pipeline 16

Needs valgrind (Debian: ``apt-get install valgrind``). Under callgrind the
server runs some 50 times slower, so requests per second mean nothing here.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from benchutil import ROOT, cpu_model, free_port, git_revision, wait_for_port

MULTICONN = f"{sys.executable} -m multiconn serve --port {{port}} --app {{app}} --log-level warning"
APPS = {"raw": "raw-echo", "framed": "echo"}


def load(port: int, mode: str, connections: int, pipeline: int, duration: float) -> int:
    """Run `multiconn bench` against the server; the requests it completed."""
    out = subprocess.run(
        [sys.executable, "-m", "multiconn", "bench", "--port", str(port), "--mode", mode,
         "--connections", str(connections), "--pipeline", str(pipeline),
         "--duration", str(duration), "--warmup", "0", "--json"],
        capture_output=True, text=True, timeout=duration + 120, check=True,
    ).stdout
    result = json.loads(out)
    if result.get("errors"):
        raise SystemExit(f"the load generator saw errors: {result['errors']}")
    return int(result["requests"])


def count(command: str, mode: str, connections: int, pipeline: int, duration: float,
          workdir: str) -> tuple[int, int]:
    """(instructions, requests) of one measured load on a fresh server."""
    port = free_port()
    argv = command.format(port=port, mode=mode, app=APPS[mode]).split()
    out_pattern = os.path.join(workdir, f"callgrind.{port}.%p")
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--trace-children=yes", f"--callgrind-out-file={out_pattern}", *argv],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for_port(port, proc)
        load(port, mode, connections, pipeline, min(duration, 3.0))  # warm-up: imports, caches, specialisation
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], capture_output=True, check=True)
        requests = load(port, mode, connections, pipeline, duration)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True, check=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    dumps = glob.glob(os.path.join(workdir, f"callgrind.{port}.{proc.pid}.1"))
    if not dumps:
        raise SystemExit("callgrind wrote no dump for the measured window")
    with open(dumps[0]) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1]), requests
    raise SystemExit(f"no instruction total in {dumps[0]}")


# The in-memory load: argv is (what, reads, frames per read); "metrics" times every answer.
IN_MEMORY = """
import sys
import time
import types
from multiconn.apps import echo
from multiconn.metrics import InlineTiming, ServerMetrics
from multiconn.testing import MemoryConnection
what, reads, per_read = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
header = (b'{"byteorder": "little", "content-type": "binary/octet-stream", '
          b'"content-encoding": "binary", "content-length": 64}')
payload = (len(header).to_bytes(2, "big") + header + b"x" * 64) * per_read
conn = MemoryConnection(echo)
if what == "metrics":
    responder = conn.session.context.responder
    loop = types.SimpleNamespace(now=time.monotonic(), clock=time.monotonic)  # what timing reads of a loop
    responder.time_requests(InlineTiming(ServerMetrics(), loop))
received, output = conn.session.data_received, conn.transport.output
for _ in range(200 + reads):  # 200 to warm up (specialisation, caches)
    received(payload)
    del output[:]
"""


def in_memory(what: str, per_read: int) -> float:
    """Instructions per frame of `IN_MEMORY`: the difference of 1,000 and 4,000 reads."""
    totals = []
    for reads in (1000, 4000):
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
             sys.executable, "-c", IN_MEMORY, what, str(reads), str(per_read)],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"},
        ).stderr
        collected = [line for line in out.splitlines() if "Collected :" in line]
        if not collected:
            raise SystemExit(f"callgrind printed no total:\n{out[-2000:]}")
        totals.append(int(collected[-1].split(":")[-1]))
    return (totals[1] - totals[0]) / (3000 * per_read)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="raw,framed", help="raw, framed or both (default)")
    parser.add_argument("--connections", type=int, default=1, help="concurrent connections (default 1)")
    parser.add_argument("--pipeline", type=int, default=1, help="requests in flight per connection (default 1)")
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per run (default 6)")
    parser.add_argument("--target", action="append", default=[], metavar="NAME=COMMAND",
                        help="a server to count ({port}, {mode} and {app} are filled in); "
                             "default: this checkout's multiconn")
    parser.add_argument("--in-memory", action="store_true",
                        help="count the framed session path alone, per frame (no server, no sockets)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind and callgrind_control (Debian: apt-get install valgrind)")
    if args.in_memory:
        print(f"# Framed session instructions per frame, in memory (callgrind), "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print(f"\nmulticonn {git_revision(ROOT)}, {cpu_model()}, Python {sys.version.split()[0]}; "
              f"{args.pipeline} frame(s) of 64 bytes per read, echo inline\n")
        print("| path | instructions per frame |")
        print("|---|---:|")
        for what, label in (("plain", "session"), ("metrics", "session, --metrics timing")):
            print(f"| {label} | {in_memory(what, args.pipeline):,.0f} |", flush=True)
        return
    targets = [t.split("=", 1) for t in args.target] or [["multiconn", MULTICONN]]
    print(f"# Server instructions per request (callgrind), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"\nmulticonn {git_revision(ROOT)}, {cpu_model()}, Python {sys.version.split()[0]}; "
          f"{args.connections} connection(s), pipeline {args.pipeline}, 64-byte messages, "
          f"{args.duration:g} s measured\n")
    print("| target | mode | instructions per request | requests counted |")
    print("|---|---|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="instructions-") as workdir:
        for mode in args.modes.split(","):
            for name, command in targets:
                instructions, requests = count(command, mode, args.connections, args.pipeline, args.duration, workdir)
                print(f"| {name} | {mode} | {instructions / requests:,.0f} | {requests:,} |", flush=True)


if __name__ == "__main__":
    main()
