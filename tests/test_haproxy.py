"""A real HAProxy in front of two `multiconn serve` instances, with the
configuration the README shows (only its ports changed), over PROXY v1 and v2.

HAProxy comes from the Debian package; `.ci/run` installs it and sets
MULTICONN_REQUIRE_HAPROXY=1, so that CI fails instead of skipping when it is
missing. Elsewhere the tests are skipped without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from multiconn import Frame, connect
from multiconn.testing import ServerProcess

from helpers import free_port

README = Path(__file__).parent.parent / "README.md"
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)

if HAPROXY is None:
    if os.environ.get("MULTICONN_REQUIRE_HAPROXY"):
        raise RuntimeError("haproxy is required here (MULTICONN_REQUIRE_HAPROXY) but not installed")
    pytest.skip("haproxy is not installed (apt-get install haproxy)", allow_module_level=True)


def readme_config() -> str:
    match = re.search(r"```haproxy\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert match, "README has no ```haproxy block"
    return match.group(1)


class Deployment:
    """Two servers (127.0.0.2 and 127.0.0.3) and HAProxy, as in the README."""

    def __init__(self, tmp_path: Path, version: str) -> None:
        self.servers = {
            host: ServerProcess("--host", host, "--app", "whoami", "--proxy-protocol", version,
                                "--drain-timeout", "2")
            for host in ("127.0.0.2", "127.0.0.3")
        }
        for server in self.servers.values():
            server.start()
        self.port = free_port("127.0.0.1")
        config = readme_config().replace("127.0.0.1:7000", f"127.0.0.1:{self.port}")
        for host, server in self.servers.items():
            config = config.replace(f"{host}:65432", f"{host}:{server.port}")
        if version == "v1":
            config = config.replace("send-proxy-v2", "send-proxy")
        self.config = tmp_path / "haproxy.cfg"
        self.config.write_text(config)
        self.log = open(tmp_path / "haproxy.log", "wb")
        self.haproxy = subprocess.Popen([HAPROXY, "-f", str(self.config), "-db"], stdout=self.log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def whoami(self, timeout: float = 5.0) -> tuple[dict, tuple[str, int]]:
        with connect("127.0.0.1", self.port, timeout=timeout) as client:
            answer = client.request(Frame.binary(b"who"))
            return json.loads(answer.content), client.sock.getsockname()[:2]

    def wait_until_both_serve(self, timeout: float = 20.0) -> None:
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(seen) < 2:
            assert time.monotonic() < deadline, f"only workers {seen} answered through HAProxy"
            try:
                seen.add(self.whoami()[0]["worker"])
            except Exception:
                time.sleep(0.2)

    def close(self) -> None:
        self.haproxy.terminate()
        try:
            self.haproxy.wait(10)
        except subprocess.TimeoutExpired:
            self.haproxy.kill()
            self.haproxy.wait()
        self.log.close()
        for server in self.servers.values():
            server.stop()


@pytest.fixture(params=["v1", "v2"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    deployed = Deployment(tmp_path, request.param)
    try:
        yield deployed
    finally:
        deployed.close()
    for host, server in deployed.servers.items():
        bad = [line for line in server.lines if " WARNING " in line or " ERROR " in line or "Traceback" in line]
        assert not bad, f"{host} logged: {bad}"


def test_haproxy_spreads_requests_and_passes_the_real_client(deployment: Deployment) -> None:
    deployment.wait_until_both_serve()
    workers = {server.pid for server in deployment.servers.values()}
    seen = []
    for _ in range(20):
        answer, client_address = deployment.whoami()
        assert answer["proxied"] is True
        assert answer["peer"] == f"{client_address[0]}:{client_address[1]}"  # our own address, not HAProxy's
        assert answer["local"] == f"127.0.0.1:{deployment.port}"
        seen.append(answer["worker"])
    assert set(seen) == workers
    assert min(seen.count(pid) for pid in workers) >= 5  # round robin


def test_a_server_stopped_with_sigterm_is_taken_out_with_nothing_refused(deployment: Deployment) -> None:
    deployment.wait_until_both_serve()
    leaving = deployment.servers["127.0.0.2"]
    staying = deployment.servers["127.0.0.3"].pid
    leaving.signal(signal.SIGTERM)
    assert leaving.wait(10) == 0
    for _ in range(30):
        answer, _ = deployment.whoami()  # raises if HAProxy cannot place the connection
        assert answer["worker"] == staying
    time.sleep(2.5)  # two failed checks: marked down
    status = deployment.haproxy.poll()
    assert status is None, f"haproxy exited with {status}"
    log = (deployment.config.parent / "haproxy.log").read_bytes().decode("utf-8", "replace")
    assert re.search(r"one is DOWN", log), log


def test_health_checks_keep_the_server_logs_clean(deployment: Deployment) -> None:
    """Several rounds of HAProxy's checks (a LOCAL header and a health frame
    every second) and nothing at WARNING or above (checked by the fixture)."""
    deployment.wait_until_both_serve()
    time.sleep(3.0)
    for server in deployment.servers.values():
        assert server.alive()
