"""TLS over real loopback sockets, with certificates made by trustme."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time

import pytest
import trustme

import multiconn
from multiconn import CertificateVerificationError, Frame, Limits, TLSError
from multiconn.testing import ServerThread

from helpers import recv_exactly


def tls_connect(server: ServerThread, context: ssl.SSLContext, **kwargs):
    return multiconn.connect(*server.address, ssl_context=context, **kwargs)


def test_search_over_tls(start_server, server_context, client_context) -> None:
    server = start_server("search", ssl_context=server_context)
    with tls_connect(server, client_context) as client:
        answer = client.request(Frame.json({"action": "search", "value": "ring"}))
    assert answer.json_content() == {"result": "In the caves beneath the Misty Mountains. \U0001f48d"}


def test_pipelining_over_tls(start_server, server_context, client_context) -> None:
    server = start_server("echo", ssl_context=server_context)
    frames = [Frame.binary(os.urandom(i % 700), id=i) for i in range(300)]
    with tls_connect(server, client_context) as client:
        answers = client.request_many(frames)
    assert [a.id for a in answers] == list(range(300))
    assert [a.content for a in answers] == [f.content for f in frames]


def test_8_mib_echo_over_tls(start_server, server_context, client_context) -> None:
    server = start_server("echo", ssl_context=server_context)
    content = os.urandom(8 * 1024 * 1024)
    with tls_connect(server, client_context, timeout=30) as client:
        assert client.request(Frame.binary(content)).content == content
        # The connection is still good afterwards.
        assert client.request(Frame.binary(b"after")).content == b"after"


def test_raw_echo_over_tls(start_server, server_context, client_context) -> None:
    server = start_server("raw-echo", ssl_context=server_context)
    with socket.create_connection(server.address, timeout=5) as plain:
        with client_context.wrap_socket(plain, server_hostname="localhost") as sock:
            sock.sendall(b"x" * 100_000)
            received = recv_exactly(sock, 100_000)
    assert received == b"x" * 100_000


def test_raw_echo_over_tls_small_messages_then_a_larger_one(start_server, server_context,
                                                          client_context) -> None:
    """Small reads first (the state in which plain raw echo takes its fast
    path), then a record larger than a small read: the rest of it waits
    decrypted in the SSL object, where only TLS's own read loop finds it."""
    server = start_server("raw-echo", ssl_context=server_context)
    with socket.create_connection(server.address, timeout=5) as plain:
        with client_context.wrap_socket(plain, server_hostname="localhost") as sock:
            for message in [b"%064d" % number for number in range(20)] + [os.urandom(5000)]:
                sock.sendall(message)
                assert recv_exactly(sock, len(message)) == message


def test_unknown_ca_raises_certificate_verification_error(start_server, server_context, client_context) -> None:
    server = start_server("echo", ssl_context=server_context)
    with pytest.raises(CertificateVerificationError) as info:
        tls_connect(server, ssl.create_default_context())
    assert isinstance(info.value, TLSError) and isinstance(info.value, multiconn.ConnectionFailed)
    # The failed handshake did not hurt the server.
    with tls_connect(server, client_context) as client:
        assert client.request(Frame.binary(b"ok")).content == b"ok"


def test_wrong_server_name_is_a_verification_error(start_server, server_context, client_context) -> None:
    server = start_server("echo", ssl_context=server_context)
    with pytest.raises(CertificateVerificationError):
        tls_connect(server, client_context, server_hostname="not-this-host.example")


def test_plain_client_on_tls_port_gets_a_clean_close(start_server, server_context, client_context) -> None:
    server = start_server("echo", ssl_context=server_context)
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(multiconn.encode_frame(Frame.binary(b"plain text request")))
        data = b""
        while True:  # a reset would raise ConnectionResetError here
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    assert not data.startswith(b"\x00")  # no frame: whatever came was TLS, then EOF
    with tls_connect(server, client_context) as client:
        assert client.request(Frame.binary(b"still serving")).content == b"still serving"


def test_plain_client_library_on_tls_port_raises_cleanly(start_server, server_context) -> None:
    server = start_server("echo", ssl_context=server_context)
    with pytest.raises(multiconn.MulticonnError):
        with multiconn.connect(*server.address, timeout=5) as client:
            client.request(Frame.binary(b"hello"))


def test_stalled_handshake_is_dropped_by_the_frame_timeout(start_server, server_context, client_context) -> None:
    server = start_server("echo", ssl_context=server_context, limits=Limits(frame_timeout=0.5))
    with socket.create_connection(server.address, timeout=5) as stalled:
        stalled.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        # Others are served meanwhile.
        with tls_connect(server, client_context) as client:
            assert client.request(Frame.binary(b"served")).content == b"served"
        started = time.monotonic()
        assert stalled.recv(4096) == b""
        assert time.monotonic() - started < 3.0


def test_tls_client_on_plain_server_gets_tls_error(start_server) -> None:
    # The plain server reads the ClientHello as the start of a frame and, when
    # the frame timeout expires, answers with an error frame: not TLS.
    server = start_server("echo", limits=Limits(frame_timeout=0.3))
    with pytest.raises(TLSError):
        multiconn.connect(*server.address, ssl_context=ssl.create_default_context(), timeout=5)


def test_cli_serve_and_request_over_tls(ca: trustme.CA, tmp_path) -> None:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    ca.cert_pem.write_to_path(str(ca_file))
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    server = subprocess.Popen(
        [sys.executable, "-m", "multiconn", "serve", "--port", "0", "--tls-cert", str(cert_file),
         "--tls-key", str(key_file)],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = server.stderr.readline()
        assert "TLS" in line, line
        port = line.split("127.0.0.1:")[1].split()[0]
        request = [sys.executable, "-m", "multiconn", "request", "--port", port]
        ok = subprocess.run(request + ["--tls-ca", str(ca_file), "search", "ring"],
                            capture_output=True, text=True, env=env, timeout=20)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == "In the caves beneath the Misty Mountains. \U0001f48d"
        bad = subprocess.run(request + ["--tls", "search", "ring"], capture_output=True, text=True,
                             env=env, timeout=20)
        assert bad.returncode == 1
        assert "certificate" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        server.terminate()
        assert server.wait(10) == 0
        server.stderr.close()
