"""The bounded soak run, ``scripts/soak.py``, as tests.

``test_soak_smoke`` runs it for 3 seconds in the default test run, so the script
itself and the server's behaviour under a short mixed load (churn, pipelining,
malformed frames, resets, slow senders) are exercised on every ``pytest``.
``test_soak`` is the real run: ``pytest -m soak``, ``SOAK_SECONDS`` sets its
length (default 60).

Both run the script as a subprocess with ``--json`` and check its verdict and
the numbers it is based on; the script's readable summary is echoed to stderr
(shown with ``pytest -s``). The script's clients build and check frames with
tests/reference_codec.py, as tests/test_stateful.py does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reference_codec import ERROR_CODES  # the soak's codec

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"
SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
#: Beyond the load itself: server start, worker start, the wait for descriptors,
#: the server's drain on SIGTERM, on a loaded machine.
OVERHEAD = 150.0
#: Every code a malformed frame of the soak must provoke (timeout and handler-error
#: cannot happen against the echo app within the default frame timeout).
DETERMINISTIC_CODES = set(ERROR_CODES) - {"timeout", "handler-error"}

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID")


def run_soak(duration: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONIOENCODING"] = "utf-8"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--duration", f"{duration:g}", "--json"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, encoding="utf-8",
        timeout=duration + OVERHEAD, env=env,
    )
    sys.stderr.write(proc.stderr)
    assert proc.returncode == 0, f"soak failed (exit {proc.returncode}):\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no JSON on stdout:\n{proc.stderr}"
    return json.loads(lines[-1])


def check(result: dict[str, Any], duration: float) -> None:
    assert result["ok"] is True and result["failures"] == []
    assert result["duration_s"] >= duration * 0.95
    connections = result["connections"]
    for kind in ("churn", "pipeline", "garbage", "reset", "slow"):
        assert connections[kind] > 0, kind
    requests = result["requests"]
    assert requests["sent"] > 0
    assert requests["sent"] == requests["answered"] == requests["verified"]
    assert result["mismatches"] == 0
    assert result["unexpected_errors"] == 0, result["unexpected_by_kind"]
    assert result["error_frames"], "no malformed frame was answered"
    assert set(result["error_frames"]) <= DETERMINISTIC_CODES
    latency = result["latency_ms"]
    assert latency["samples"] > 0
    assert 0 <= latency["accept_p50"] <= latency["accept_p99"] <= latency["accept_max"]
    assert latency["connect_p99"] <= latency["connect_max"]
    fds = result["fds"]
    assert fds["end"] <= fds["baseline"]
    rss = result["rss_mib"]
    assert rss["delta"] < rss["tolerance"]
    if rss["growth_limit"] is not None:
        assert rss["growth_after_warmup"] < rss["growth_limit"]
    server = result["server"]
    assert server["exit_code"] == 0
    assert server["tracebacks"] == 0
    assert server["error_lines"] == []


def test_soak_smoke() -> None:
    """Three seconds of the soak: every kind of client runs and all is well after."""
    result = run_soak(3)
    check(result, 3)


@pytest.mark.soak
@pytest.mark.timeout(SOAK_SECONDS + OVERHEAD + 30)
def test_soak() -> None:
    """The bounded soak: SOAK_SECONDS (default 60) of mixed load, then a clean bill of health."""
    result = run_soak(SOAK_SECONDS)
    check(result, SOAK_SECONDS)
    # Long enough for every malformed case to come up many times.
    assert set(result["error_frames"]) == DETERMINISTIC_CODES
    assert result["connections"]["churn"] >= 1000
    assert result["connections"]["pipeline"] == 20  # long-lived: never reopened
