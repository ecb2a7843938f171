"""``--metrics``: the Prometheus endpoint, parsed with prometheus_client's own parser,
with values checked against the traffic each test sends."""

from __future__ import annotations

import socket
import sys
import time
import urllib.error
import urllib.request
from bisect import bisect_left
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from multiconn import Frame, Limits, encode_frames
from multiconn.metrics import DURATION_BUCKETS, Histogram
from multiconn.testing import ServerProcess

from helpers import free_port

sys.path.insert(0, str(Path(__file__).parent / "apps"))
import pool_apps  # noqa: E402


def scrape(server: Any) -> dict[str, Any]:
    """{sample name with labels: value} from one scrape, parsed by prometheus_client."""
    host, port = server.server.metrics_endpoint.addresses[0]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = response.read().decode("utf-8")
    samples: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        samples[f"# type {family.name}"] = family.type
    return samples


def scrape_until(server: Any, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
    """Scrape until `predicate(samples)` holds (the server may not have seen a close yet)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        if predicate(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def metrics_server(start_server: Any, app: Any = "echo", **kwargs: Any) -> Any:
    return start_server(app, metrics_address=("127.0.0.1", 0), **kwargs)


def test_counters_match_the_traffic_sent(start_server) -> None:
    server = metrics_server(start_server)
    frames = [Frame.binary(b"x" * 100, id=i) for i in range(50)]
    payload = encode_frames(frames)
    with server.connect(timeout=5) as client:
        assert len(client.request_many(frames)) == 50
        open_now = scrape(server)
    assert open_now["multiconn_connections_open"] == 1
    samples = scrape_until(server, lambda s: s["multiconn_connections_open"] == 0)
    assert samples["multiconn_connections_open"] == 0
    assert samples["multiconn_connections_accepted_total"] == 1
    assert samples["multiconn_connections_closed_total{reason=done}"] == 1
    assert samples["multiconn_requests_total"] == 50
    assert samples["multiconn_frames_sent_total"] == 50
    # The kernel's count: our payload, plus at most one for the FIN's sequence number.
    assert len(payload) <= samples["multiconn_received_bytes_total"] <= len(payload) + 1
    assert samples["multiconn_sent_bytes_total"] >= len(payload)  # answers echo the same, ids included
    assert samples["multiconn_request_duration_seconds_count"] == 50
    assert samples['multiconn_request_duration_seconds_bucket{le=+Inf}'] == 50
    assert samples["# type multiconn_requests"] == "counter"
    assert samples["# type multiconn_request_duration_seconds"] == "histogram"


def test_histogram_buckets_are_cumulative_and_log_spaced(start_server) -> None:
    server = metrics_server(start_server, pool_apps.slow)
    with server.connect(timeout=5) as client:
        client.request_many([Frame.binary(b"fast")] * 5 + [Frame.binary(b"sleep:0.03")] * 2)
    samples = scrape(server)
    buckets = [samples[f"multiconn_request_duration_seconds_bucket{{le={b!r}}}".replace("'", "")]
               for b in map(lambda b: f"{b:g}", DURATION_BUCKETS)]
    assert buckets == sorted(buckets)  # cumulative
    assert samples["multiconn_request_duration_seconds_bucket{le=0.025}"] == 5
    # From arrival: the second sleep, when read in the same wake-up as the
    # first, counts its wait for it (0.06 s); read later, only its own 0.03 s.
    assert samples["multiconn_request_duration_seconds_bucket{le=0.05}"] in (6, 7)
    assert samples["multiconn_request_duration_seconds_bucket{le=0.1}"] == 7
    assert samples["multiconn_request_duration_seconds_sum"] >= 0.06
    ratios = [b / a for a, b in zip(DURATION_BUCKETS, DURATION_BUCKETS[1:])]
    assert all(2 <= r <= 2.5 for r in ratios)


def test_a_request_read_with_a_slow_one_counts_its_wait(start_server) -> None:
    """Durations run from arrival: two 30 ms requests sent in one small write,
    so read together, are answered about 30 and 60 ms after they arrived."""
    server = metrics_server(start_server, pool_apps.slow)
    with server.connect(timeout=5) as client:
        client.request_many([Frame.binary(b"sleep:0.03")] * 2)
    samples = scrape(server)
    assert samples["multiconn_request_duration_seconds_bucket{le=0.025}"] == 0
    assert samples["multiconn_request_duration_seconds_bucket{le=0.05}"] == 1
    assert samples["multiconn_request_duration_seconds_bucket{le=0.1}"] == 2
    assert samples["multiconn_request_duration_seconds_sum"] >= 0.09


def test_histogram_batches_count_as_one_bisect_per_value_would() -> None:
    """Folding a sorted batch puts every value where a bisect of the bounds
    would: a value equal to a bound in that bound's bucket (``le``), values
    past the last bound in +Inf; folds in mid-stream and at reading lose nothing."""
    bounds = (0.001, 0.01, 0.1)
    values = [0.0, 0.001, 0.0010001, 0.01, 0.05, 0.1, 0.2, 7.0] * 400  # 3,200: three folds, then a rest
    histogram = Histogram(bounds)
    for value in values:
        histogram.observe(value)
    assert 0 < len(histogram.pending) < Histogram.FOLD_AT
    expected = [0] * (len(bounds) + 1)
    for value in values:
        expected[bisect_left(bounds, value)] += 1
    assert histogram.counts == expected == [800, 800, 800, 800]
    assert histogram.pending == []
    assert histogram.sum == pytest.approx(sum(values))
    assert histogram.count == len(values)
    assert Histogram.from_list(histogram.as_list(), bounds).counts == expected


def test_requests_past_a_fold_are_all_counted(start_server) -> None:
    server = metrics_server(start_server)
    total = Histogram.FOLD_AT * 2 + 7
    with server.connect(timeout=5) as client:
        for start in range(0, total, 500):
            client.request_many([Frame.binary(b"x")] * min(500, total - start))
    samples = scrape(server)
    assert samples["multiconn_requests_total"] == total
    assert samples["multiconn_request_duration_seconds_bucket{le=+Inf}"] == total
    assert 0 < samples["multiconn_request_duration_seconds_sum"] < total  # seconds, each well under one


def test_error_frames_by_code_and_close_reasons(start_server) -> None:
    server = metrics_server(start_server, "search")
    with server.connect(timeout=5) as client:
        answers = client.request_many([Frame({"content-type": "text/json", "content-encoding": "utf-8"}, b"[")],
                                      raise_errors=False)
        assert answers[0].error_info[0] == "bad-content"
    with socket.create_connection(server.address) as sock:
        sock.sendall(b"\x00\x00")  # bad-header-length: fatal
        sock.settimeout(5)
        while sock.recv(4096):
            pass
    samples = scrape_until(server, lambda s: s.get("multiconn_connections_closed_total{reason=done}") == 1
                           and s.get("multiconn_connections_closed_total{reason=error}") == 1)
    assert samples["multiconn_error_frames_total{code=bad-content}"] == 1
    assert samples["multiconn_error_frames_total{code=bad-header-length}"] == 1
    assert samples["multiconn_connections_closed_total{reason=error}"] == 1
    assert samples["multiconn_connections_closed_total{reason=done}"] == 1


def _answers_of_every_kind(request: Frame) -> Frame:
    """An app's own error frame for "missing", a raise for "boom", else an echo."""
    if request.content == b"missing":
        return Frame.error("not-found", "no such thing")  # without the request's id: run_handler copies it
    if request.content == b"boom":
        raise RuntimeError("boom")
    return Frame.binary(request.content)


def test_inline_answers_of_every_kind_are_timed_and_errors_counted(start_server) -> None:
    """Every inline answer is timed, whichever path made it: the app's, an app's
    own error frame, the error frame of a raise, a health check's."""
    server = metrics_server(start_server, _answers_of_every_kind)
    requests = [Frame.binary(b"x", id=1), Frame.binary(b"missing", id=2), Frame.binary(b"boom", id=3),
                Frame.binary(b"", content_type="binary/health", id=4), Frame.binary(b"missing", id=5)]
    with server.connect(timeout=5) as client:
        answers = client.request_many(requests, raise_errors=False)
    assert [a.header.get("id") for a in answers] == [1, 2, 3, 4, 5]
    assert [a.error_info and a.error_info[0] for a in answers] == [
        None, "not-found", "handler-error", None, "not-found"]
    assert answers[3].content == b"ok"
    samples = scrape(server)
    assert samples["multiconn_request_duration_seconds_count"] == 5
    assert samples["multiconn_error_frames_total{code=not-found}"] == 2
    assert samples["multiconn_error_frames_total{code=handler-error}"] == 1


def test_backpressure_pauses_are_counted(start_server) -> None:
    server = metrics_server(start_server, limits=Limits(high_water=64 * 1024, low_water=16 * 1024))
    big = Frame.binary(b"y" * 256 * 1024)
    with server.connect(timeout=10) as client:
        client.request_many([big] * 8)
    assert scrape(server)["multiconn_backpressure_pauses_total"] >= 1


@pytest.mark.parametrize("pool, app", [("thread", pool_apps.slow), ("process", pool_apps.slow),
                                       ("inline", pool_apps.async_slow)])
def test_pool_metrics(start_server, pool, app) -> None:
    server = metrics_server(start_server, app, handler_pool=pool, pool_size=1 if pool != "inline" else None)
    with socket.create_connection(server.address) as sock:
        sock.sendall(encode_frames(Frame.binary(b"sleep:0.5", id=i) for i in range(3)))
        kind = {"inline": "async"}.get(pool, pool)
        during = scrape_until(server, lambda s: s[f"multiconn_pool_queued{{pool={kind}}}"]
                              + s[f"multiconn_pool_in_flight{{pool={kind}}}"] == 3)
        sock.settimeout(5)
        received = b""
        while received.count(b"sleep:0.5") < 3:
            received += sock.recv(4096)
    if pool != "inline":
        assert during[f"multiconn_pool_in_flight{{pool={kind}}}"] == 1  # one worker
        assert during[f"multiconn_pool_queued{{pool={kind}}}"] == 2  # and two wait for it
    else:
        assert during[f"multiconn_pool_in_flight{{pool={kind}}}"] == 3  # async: all run at once
    after = scrape_until(server, lambda s: s[f"multiconn_pool_wait_seconds_count{{pool={kind}}}"] == 3)
    assert after[f"multiconn_pool_in_flight{{pool={kind}}}"] == 0
    assert after[f"multiconn_pool_wait_seconds_count{{pool={kind}}}"] == 3
    if pool != "inline":
        assert after[f"multiconn_pool_wait_seconds_sum{{pool={kind}}}"] >= 0.5 + 1.0 - 0.1
    assert after["multiconn_requests_total"] == 3


def test_only_get_metrics_is_served(start_server) -> None:
    server = metrics_server(start_server)
    host, port = server.server.metrics_endpoint.addresses[0]
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://{host}:{port}/", timeout=5)
    assert missing.value.code == 404
    request = urllib.request.Request(f"http://{host}:{port}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as post:
        urllib.request.urlopen(request, timeout=5)
    assert post.value.code == 405


def test_metrics_off_by_default(start_server) -> None:
    server = start_server("echo")
    assert server.server.metrics is None and server.server.metrics_endpoint is None


def test_cli_metrics_flag_during_a_bench_run(tmp_path) -> None:
    """What the README shows: `curl HOST:PORT/metrics` while `multiconn bench` runs."""
    metrics_port = free_port()
    with ServerProcess("--app", "echo", "--metrics", f"127.0.0.1:{metrics_port}") as server:
        assert server.wait_for_line(f"metrics on http://127.0.0.1:{metrics_port}/metrics", 5)
        import subprocess

        bench = subprocess.Popen([sys.executable, "-m", "multiconn", "bench", "--port", str(server.port),
                                  "--connections", "4", "--duration", "1.5", "--warmup", "0", "--json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
                text = response.read().decode()
        finally:
            bench.communicate(timeout=30)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["multiconn_connections_open"].samples[0].value == 4
        assert families["multiconn_requests"].samples[0].value > 0


def test_bad_metrics_address_is_refused() -> None:
    import subprocess

    result = subprocess.run([sys.executable, "-m", "multiconn", "serve", "--metrics", "nonsense"],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2 and "HOST:PORT" in result.stderr


def test_workers_report_the_whole_server_and_never_go_backwards() -> None:
    """With --workers 2 the supervisor serves /metrics: every worker's counters
    summed, and a worker killed with SIGKILL does not take its counts with it."""
    import os
    import signal

    metrics_port = free_port()

    def scrape_cli() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        samples: dict[str, Any] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    with ServerProcess("--app", "echo", "--workers", "2", "--metrics", f"127.0.0.1:{metrics_port}") as server:
        pids: set[int] = set()
        sent = 0
        for _ in range(40):  # fresh connections: the kernel spreads them over both workers
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(encode_frames(Frame.binary(b"x", id=i) for i in range(5)))
                sock.settimeout(5)
                received = b""
                while received.count(b'"id"') < 5:
                    received += sock.recv(4096)
                sent += 5
        deadline = time.monotonic() + 5
        while True:
            before = scrape_cli()
            if before.get("multiconn_requests_total") == sent or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert before["multiconn_requests_total"] == sent
        assert before["multiconn_connections_accepted_total"] == 40
        workers = {key: value for key, value in before.items() if key.startswith("multiconn_worker_connections_open")}
        assert len(workers) == 2
        pids = {int(key.split("pid=")[1].split(",")[0].rstrip("}")) for key in workers}
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            after = scrape_cli()
            if after.get("multiconn_worker_restarts_total") == 1 and len(
                    [k for k in after if k.startswith("multiconn_worker_connections_open")]) == 2:
                break
            assert time.monotonic() < deadline, after
            time.sleep(0.1)
        assert after["multiconn_requests_total"] >= before["multiconn_requests_total"]
        assert after["multiconn_connections_accepted_total"] >= before["multiconn_connections_accepted_total"]
        assert victim not in {int(k.split("pid=")[1].split(",")[0].rstrip("}")) for k in after
                              if k.startswith("multiconn_worker_connections_open")}
    assert "Traceback" not in server.stderr
