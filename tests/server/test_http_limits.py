"""The reference server's HTTP limits against a real process on loopback: slow clients, oversize
requests, malformed requests, and what only a web page would send (issue 10, items 3, 4 and 8)."""

from __future__ import annotations

import json
import socket
import threading
import time

import psutil
import pytest
import requests
import torch
from conftest import TINY_VOCAB, ServerProcess

from grpo_split.config.server import ServerConfig
from grpo_split.contract.batch import Batch, encode_batch
from grpo_split.server.app import HTTPFailure, ReferenceServerApp

REQUEST_TIMEOUT = 2.0
MAX_CONNECTIONS = 64
MAX_TOKENS = 4096


def make_batch(rows: int, length: int, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    return Batch(input_ids=torch.randint(0, TINY_VOCAB, (rows, length), generator=gen), prompt_length=length // 2)


@pytest.fixture(scope="module")
def limited_server(tiny_model_dir):
    server = ServerProcess(
        tiny_model_dir, "--max_connections", str(MAX_CONNECTIONS), "--request_timeout_seconds", str(REQUEST_TIMEOUT),
        "--max_request_tokens", str(MAX_TOKENS), "--max_batch_tokens", str(MAX_TOKENS),
    )
    yield server
    assert server.stop() == 0, "".join(server.stderr_lines[-40:])


def raw_exchange(url: str, request: bytes, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """Send raw bytes, read until the server closes; (status, headers, body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def assert_json_error(status: int, headers: dict, body: bytes, expected_status: int, *words: str) -> str:
    assert status == expected_status, (status, body[:300])
    assert headers["content-type"].startswith("application/json"), headers
    message = json.loads(body)["error"]
    for word in words:
        assert word in message, message
    return message


# ---------------------------------------------------------------------------- item 3: slow clients


def test_slow_connections_are_dropped_and_healthy_clients_keep_their_latency(limited_server):
    url = limited_server.url
    host, port = url.removeprefix("http://").split(":")
    trickle = b"POST /logps HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
    slow: list[socket.socket] = []
    opened: list[float] = []
    closed: dict[int, float] = {}
    latencies: list[float] = []
    stop = threading.Event()

    def healthy():
        body = encode_batch(make_batch(2, 16))
        with requests.Session() as session:
            while not stop.is_set():
                for send in (lambda: requests.get(url + "/health", timeout=5),  # a new connection each time
                             lambda: session.post(url + "/logps", data=body, timeout=5)):
                    start = time.monotonic()
                    try:
                        ok = send().status_code == 200
                    except requests.RequestException:
                        ok = False
                    latencies.append(time.monotonic() - start if ok else float("inf"))
                time.sleep(0.02)

    try:
        for _ in range(150):  # 1 byte every 0.5 s each, more than max_connections and than waitress's 100
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.setblocking(False)
            slow.append(sock)
            opened.append(time.monotonic())
        client = threading.Thread(target=healthy)
        client.start()
        position = 0
        # Room for a loaded 2-core CI machine: the guard checks every second, and without it a
        # trickling connection would stay open for as long as it keeps sending.
        deadline = time.monotonic() + REQUEST_TIMEOUT + 6.0
        while time.monotonic() < deadline and len(closed) < len(slow):
            for i, sock in enumerate(slow):
                if i in closed:
                    continue
                try:
                    if sock.recv(1) == b"":
                        closed[i] = time.monotonic()
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    closed[i] = time.monotonic()
                    continue
                try:
                    sock.send(trickle[position : position + 1])
                except OSError:
                    closed[i] = time.monotonic()
            position += 1
            time.sleep(0.5)
        stop.set()
        client.join(timeout=10)
    finally:
        stop.set()
        for sock in slow:
            sock.close()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"\nhealthy requests under 150 slow connections: {len(latencies)}, p50 "
          f"{latencies[len(latencies) // 2] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms")
    assert len(latencies) >= 20 and p99 < 1.0
    assert len(closed) == len(slow), f"{len(slow) - len(closed)} slow connections still open"
    # Shed at once for room, or closed at the deadline (checked every second, within a 1 s loop timeout;
    # measured at most 4.5 s here, the bound leaves room for a loaded machine).
    assert max(closed[i] - opened[i] for i in closed) < REQUEST_TIMEOUT + 5.0
    errors = requests.get(url + "/stats", timeout=5).json()["errors"]
    assert errors.get("request_timeout", 0) + errors.get("connection_shed", 0) >= len(slow)


# ---------------------------------------------------------------------------- item 4: request size


def test_requests_over_the_token_cap_get_413_naming_the_limit(limited_server):
    at_cap = requests.post(limited_server.url + "/logps", data=encode_batch(make_batch(2, MAX_TOKENS // 2)), timeout=30)
    assert at_cap.status_code == 200
    over = requests.post(limited_server.url + "/logps", data=encode_batch(make_batch(3, MAX_TOKENS // 2)), timeout=30)
    assert over.status_code == 413 and "--max_request_tokens=4096" in over.json()["error"]


def test_a_content_length_over_the_cap_is_refused_from_the_headers_alone(limited_server):
    # No body follows: the answer must come from the headers, before anything is buffered.
    for length in (10**12, ServerConfig("m", max_request_tokens=MAX_TOKENS).max_body_bytes + 1):
        request = (f"POST /logps HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
                   f"Content-Length: {length}\r\n\r\n").encode()
        status, headers, body = raw_exchange(limited_server.url, request, timeout=3)
        assert_json_error(status, headers, body, 413, f"{length} bytes", "--max_request_tokens=4096")


def test_server_memory_stays_flat_under_concurrent_oversize_requests(tiny_model_dir):
    server = ServerProcess(tiny_model_dir)  # default limits
    try:
        process = psutil.Process(server.proc.pid)
        requests.get(server.url + "/health", timeout=10)
        before = process.memory_info().rss
        peak = [before]
        body = b"\0" * 200_000_000  # under the old 256 MB cap, far over the default token cap's bodies
        done = threading.Event()

        def watch():
            while not done.is_set():
                peak.append(process.memory_info().rss)
                time.sleep(0.01)

        answers: list[int | str] = []

        def send():
            try:
                answers.append(requests.post(server.url + "/logps", data=body, timeout=60).status_code)
            except requests.RequestException as exc:  # the server may close before the body is all sent
                answers.append(type(exc).__name__)

        watcher = threading.Thread(target=watch)
        watcher.start()
        senders = [threading.Thread(target=send) for _ in range(4)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(timeout=120)
        done.set()
        watcher.join()
        growth_mb = (max(peak) - before) / 1e6
        print(f"\nserver RSS growth under 4 concurrent 200 MB requests: {growth_mb:.1f} MB; answers {answers}")
        assert answers.count(413) >= 1 and set(answers) <= {413, "ConnectionError"}, answers
        assert growth_mb < 50
        assert requests.get(server.url + "/health", timeout=10).status_code == 200
    finally:
        assert server.stop() == 0


def test_requests_beyond_the_inflight_budget_get_503_with_retry_after():
    config = ServerConfig(model_name_or_path="m", max_inflight_request_mb=1.0, retry_after_seconds=3)
    app = ReferenceServerApp(scorer=None, config=config, model_info={"vocab_size": TINY_VOCAB})
    with app._inflight_budget(2_000_000):  # alone: admitted even over the budget
        with pytest.raises(HTTPFailure) as info, app._inflight_budget(10):
            pass
    assert info.value.status == 503 and info.value.headers == {"Retry-After": "3"}
    with app._inflight_budget(600_000), app._inflight_budget(400_000):  # within the budget together
        pass
    assert app._inflight_bytes == 0


# ---------------------------------------------------------------------------- item 8: the error contract


@pytest.mark.parametrize("request_bytes, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header Without Colon\r\n\r\n", 400),
    (b"POST /logps HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n", 400),
    (b"POST /logps HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n", 431),
    (b"POST /logps HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"  # over the cap, no length
     + b"%x\r\n" % 2_000_000 + b"\0" * 2_000_000 + b"\r\n0\r\n\r\n", 413),
])
def test_requests_waitress_refuses_itself_get_json_errors(limited_server, request_bytes, status):
    assert_json_error(*raw_exchange(limited_server.url, request_bytes), status)


def test_non_ascii_authorization_is_401_without_echoing_anything(tiny_model_dir):
    server = ServerProcess(tiny_model_dir, env={"REF_SERVER_TOKEN": "s3cret"})
    try:
        for value in (b"Bearer \xff\xfe", b"\xc3\xa9t\xc3\xa9 s3cret", b"Bearer s3cret\x80"):
            request = (b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                       b"Authorization: " + value + b"\r\n\r\n")
            message = assert_json_error(*raw_exchange(server.url, request), 401, "token")
            assert "Error" not in message and "codec" not in message
        ok = requests.get(server.url + "/stats", headers={"Authorization": "Bearer s3cret"}, timeout=10)
        assert ok.status_code == 200 and "server_error" not in ok.json()["errors"]
        # With a token, a browser cannot use the server anyway: content type and Host are not checked.
        body = encode_batch(make_batch(2, 8))
        other = requests.post(server.url + "/logps", data=body, timeout=30, headers={
            "Authorization": "Bearer s3cret", "Content-Type": "text/plain", "Host": "rebound.example"})
        assert other.status_code == 200
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "Text/Plain;charset=UTF-8"])
def test_without_a_token_content_types_a_web_page_can_send_cross_site_get_415(limited_server, content_type):
    body = encode_batch(make_batch(2, 8))
    for path in ("/logps", "/upload", "/ack/abc"):
        response = requests.post(limited_server.url + path, data=body, headers={"Content-Type": content_type},
                                 timeout=30)
        assert response.status_code == 415 and "application/octet-stream" in response.json()["error"]


def test_without_a_token_octet_stream_or_no_content_type_is_accepted(limited_server):
    body = encode_batch(make_batch(2, 8))
    typed = requests.post(limited_server.url + "/logps", data=body,
                          headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert typed.status_code == 200
    untyped = b"POST /logps HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
    assert raw_exchange(limited_server.url, untyped + body)[0] == 200


@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1", True), ("127.0.0.1:1", True), ("localhost:8000", True), ("LOCALHOST", True), ("[::1]:99", True),
    ("10.1.2.3:59875", True), ("rebind.attacker.example", False), ("rebind.attacker.example:59875", False),
    ("localhost.attacker.example", False), ("127.0.0.1.nip.io", False),
])
def test_without_a_token_a_host_that_is_not_this_server_gets_421(limited_server, host, allowed):
    response = requests.get(limited_server.url + "/health", headers={"Host": host}, timeout=10)
    if allowed:
        assert response.status_code == 200
    else:
        assert response.status_code == 421 and "--auth_token" in response.json()["error"]
