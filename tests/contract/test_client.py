"""RefServerClient against a fake reference server: a bottle app on waitress, on a free loopback port.

The fake answers with canned behaviour each test sets (503 a few times, 401 without the token,
204 when nothing is ready) and counts the requests it gets, so the tests check what went over the
wire: how many attempts, which server, which headers.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import socket
import threading
import time

import bottle
import pytest
import requests
import torch
from helpers import LoopbackServer

from grpo_split.contract.batch import Batch, decode_batch, encode_batch
from grpo_split.contract.client import RefServerClient, RefServerError

B, T, P, G = 4, 10, 6, 2  # batch rows, sequence length, prompt length, generations per prompt


def make_batch(seed: int = 0) -> Batch:
    """A small valid batch without ref_logps, as a generation worker would send it."""
    gen = torch.Generator().manual_seed(seed)
    return Batch(
        input_ids=torch.randint(0, 100, (B, T), generator=gen, dtype=torch.int64),
        prompt_length=P,
        attention_mask=torch.ones(B, T, dtype=torch.int64),
        rewards=torch.rand(B, generator=gen),
        advantages=torch.randn(B, generator=gen),
        old_logps=-torch.rand(B, T - P, generator=gen),
        completion_mask=torch.ones(B, T - P, dtype=torch.int64),
        ref_logps=None,
        policy_version=3,
        num_generations=G,
        batch_id=None,
        temperature=1.0,
    )


def fake_ref_logps(batch: Batch) -> torch.Tensor:
    """What the fake /logps "computes": derived from the ids, so the test sees its own data come back."""
    return -batch.input_ids[:, batch.prompt_length :].to(torch.float32) / 100  # (B, T-P)


def json_error(status: int, message: str, headers: dict | None = None) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(
        json.dumps({"error": message}), status, headers={"Content-Type": "application/json", **(headers or {})}
    )


class FakeRefServer:
    """The reference server's HTTP contract with canned answers; attributes steer it, counters record requests."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.hits: collections.Counter[str] = collections.Counter()  # first path segment -> requests
        self.authorization: list[str | None] = []  # the Authorization header of each request
        self.upload_busy = 0  # answer this many uploads with 503 before accepting
        self.logps_busy = 0  # same for /logps
        self.retry_after: str | None = "0"  # the Retry-After header sent with 503; None leaves it out
        self.logps_answer: bottle.HTTPResponse | None = None  # answer /logps with this instead of scoring
        self.logps_delay = 0.0
        self.logps_done = threading.Event()  # set when a /logps handler has finished, answer sent or not
        self.ready: collections.deque[Batch] = collections.deque()  # what /get hands out; empty -> 204
        self.queued: list[Batch] = []
        self.upload_ids: list[str | None] = []  # the upload_id query parameter of each /upload
        self.leased: dict[str, str] = {}  # batch_id -> lease id
        self.acked: list[str] = []
        self.dead_letters: list[tuple[str, str]] = []  # (batch_id, reason)
        self.app = bottle.Bottle()
        self.app.install(self._guard)
        self.app.route("/health", "GET", self.health)
        self.app.route("/stats", "GET", self.stats)
        self.app.route("/logps", "POST", self.logps)
        self.app.route("/upload", "POST", self.upload)
        self.app.route("/get", "GET", self.get)
        self.app.route("/ack/<batch_id>", "POST", self.ack)
        self.app.route("/dead/<batch_id>", "POST", self.dead)

    def _guard(self, callback):
        """Bottle plugin: count the request, then demand the bearer token everywhere but /health."""

        def wrapper(*args, **kwargs):
            path = bottle.request.path
            self.hits[path.split("/")[1]] += 1
            header = bottle.request.get_header("Authorization")
            self.authorization.append(header)
            if self.token is not None and path != "/health" and header != f"Bearer {self.token}":
                return json_error(401, "missing or wrong bearer token")
            return callback(*args, **kwargs)

        return wrapper

    def _busy(self) -> bottle.HTTPResponse:
        headers = {} if self.retry_after is None else {"Retry-After": self.retry_after}
        return json_error(503, "queue full", headers)

    def health(self):
        return {"status": "ok", "model": "fake", "vocab_size": 100, "device": "cpu", "dtype": "float32", "format": 1}

    def stats(self):
        return {"requests": sum(self.hits.values()), "queued": len(self.queued)}

    def logps(self):
        if self.logps_busy > 0:
            self.logps_busy -= 1
            return self._busy()
        if self.logps_answer is not None:
            return self.logps_answer
        if bottle.request.content_type != "application/octet-stream":
            return json_error(400, f"expected application/octet-stream, got {bottle.request.content_type}")
        time.sleep(self.logps_delay)
        batch = decode_batch(bottle.request.body.read())
        bottle.response.content_type = "application/octet-stream"
        self.logps_done.set()
        return encode_batch(dataclasses.replace(batch, ref_logps=fake_ref_logps(batch)))

    def upload(self):
        self.upload_ids.append(bottle.request.query.get("upload_id"))
        if self.upload_busy > 0:
            self.upload_busy -= 1
            return self._busy()
        self.queued.append(decode_batch(bottle.request.body.read()))
        bottle.response.status = 202
        return {"queued": len(self.queued)}

    def get(self):
        if not self.ready:
            return bottle.HTTPResponse(status=204)
        batch = self.ready.popleft()
        self.leased[batch.batch_id] = f"lease-of-{batch.batch_id}"
        bottle.response.content_type = "application/octet-stream"
        bottle.response.set_header("X-Lease-Id", self.leased[batch.batch_id])
        return encode_batch(batch)

    def ack(self, batch_id):
        if batch_id not in self.leased:
            return json_error(404, f"unknown batch_id {batch_id!r}")
        if bottle.request.query.get("lease") != self.leased[batch_id]:
            return json_error(409, f"batch {batch_id} is held by another lease")
        del self.leased[batch_id]
        self.acked.append(batch_id)
        return {"acked": batch_id}

    def dead(self, batch_id):
        body = json.loads(bottle.request.body.read())
        if self.leased.get(batch_id) != body["lease"]:
            return json_error(409, f"batch {batch_id} is held by another lease")
        del self.leased[batch_id]
        self.dead_letters.append((batch_id, body["reason"]))
        return {"dead_lettered": batch_id}


def free_port() -> int:
    """A loopback port nobody listens on (bound, read, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def start_fake():
    """start_fake(token=None) -> (FakeRefServer, its URL); every server started is closed at teardown."""
    servers = []

    def start(token: str | None = None) -> tuple[FakeRefServer, str]:
        fake = FakeRefServer(token)
        servers.append(LoopbackServer(fake.app))
        return fake, servers[-1].url

    yield start
    still_connected = [server.url for server in servers if not server.close()]
    assert not still_connected, f"a client kept its connection to {still_connected} open after close()"


def fast_client(urls, **kwargs) -> RefServerClient:
    """A client with backoffs small enough for tests; the retry logic is the same."""
    settings = dict(timeout=5.0, connect_timeout=1.0, max_retries=3, backoff=0.01, max_backoff=0.05)
    settings.update(kwargs)
    return RefServerClient(urls, **settings)


@pytest.fixture(autouse=True)
def no_token_from_env(monkeypatch):
    monkeypatch.delenv("REF_SERVER_TOKEN", raising=False)


# ---------------------------------------------------------------------------- calls that succeed


def test_logps_round_trip(start_fake):
    fake, url = start_fake()
    batch = make_batch()
    with fast_client(url) as client:
        ref_logps = client.logps(batch)
    assert ref_logps.dtype == torch.float32 and ref_logps.shape == (B, T - P)
    torch.testing.assert_close(ref_logps, fake_ref_logps(batch), rtol=0, atol=0)
    assert fake.hits["logps"] == 1


def test_health_and_stats_round_robin_across_servers(start_fake):
    fake_a, url_a = start_fake()
    fake_b, url_b = start_fake()
    with fast_client([url_a, url_b + "/"]) as client:
        assert client.health()["status"] == "ok"
        assert client.health()["model"] == "fake"
        assert "requests" in client.stats()
        assert "queued" in client.stats()
    assert fake_a.hits == {"health": 1, "stats": 1} and fake_b.hits == {"health": 1, "stats": 1}


def test_upload_is_retried_through_503(start_fake):
    fake, url = start_fake()
    fake.upload_busy = 2
    with fast_client(url) as client:
        answer = client.upload(make_batch(), max_wait=10)
    assert answer == {"queued": 1}
    assert fake.hits["upload"] == 3
    torch.testing.assert_close(fake.queued[0].input_ids, make_batch().input_ids)
    # One upload id on every attempt, so a server that stored an attempt whose answer was lost can tell.
    assert len(set(fake.upload_ids)) == 1 and fake.upload_ids[0]


def test_each_upload_has_its_own_id_unless_the_caller_resends_one(start_fake):
    fake, url = start_fake()
    with fast_client(url) as client:
        client.upload(make_batch())
        client.upload(make_batch())
        client.upload(make_batch(), upload_id="resent-7")
    assert fake.upload_ids[0] != fake.upload_ids[1] and fake.upload_ids[2] == "resent-7"


def test_upload_waits_as_long_as_retry_after_says(start_fake):
    fake, url = start_fake()
    fake.upload_busy, fake.retry_after = 1, "1"
    with fast_client(url) as client:
        start = time.monotonic()
        client.upload(make_batch(), max_wait=10)
        elapsed = time.monotonic() - start
    assert fake.hits["upload"] == 2
    assert 0.9 <= elapsed < 3


def test_upload_raises_timeout_when_the_queue_stays_full(start_fake):
    fake, url = start_fake()
    fake.upload_busy = 10**9
    with fast_client(url) as client:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="queue stayed full") as info:
            client.upload(make_batch(), max_wait=0.3)
        elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 2
    assert fake.hits["upload"] >= 2 and "queue full" in str(info.value)


def test_get_returns_none_when_nothing_is_ready_then_a_batch(start_fake):
    fake, url = start_fake()
    with fast_client(url) as client:
        assert client.get() is None
        batch = make_batch()
        batch.ref_logps = fake_ref_logps(batch)
        batch.batch_id = "b-1"
        fake.ready.append(batch)
        got = client.get(lease_seconds=30)
        assert isinstance(got, Batch) and got.batch_id == "b-1" and got.lease == "lease-of-b-1"
        torch.testing.assert_close(got.input_ids, batch.input_ids)
        torch.testing.assert_close(got.ref_logps, batch.ref_logps)
        with pytest.raises(RefServerError) as info:
            client.ack("b-1", "someone-elses-lease")
        assert info.value.status == 409
        client.ack("b-1", got.lease)
    assert fake.acked == ["b-1"]


def test_dead_letter_sends_the_lease_and_the_reason(start_fake):
    fake, url = start_fake()
    batch = make_batch()
    batch.ref_logps, batch.batch_id = fake_ref_logps(batch), "b-2"
    fake.ready.append(batch)
    with fast_client(url) as client:
        got = client.get()
        with pytest.raises(ValueError, match="needs a reason"):
            client.dead_letter(got.batch_id, got.lease, " ")
        client.dead_letter(got.batch_id, got.lease, "wrong shape for this trainer")
    assert fake.dead_letters == [("b-2", "wrong shape for this trainer")] and fake.acked == []


def test_ack_goes_to_the_server_that_leased_the_batch(start_fake):
    fake_a, url_a = start_fake()
    fake_b, url_b = start_fake()
    batch = make_batch()
    batch.ref_logps, batch.batch_id = fake_ref_logps(batch), "from-a"
    fake_a.ready.append(batch)
    with fast_client([url_a, url_b]) as client:
        got = client.get()
        assert got.batch_id == "from-a"  # the first call goes to the first URL
        client.ack("from-a", got.lease)  # round robin alone would send this to b, which does not know the id
    assert fake_a.acked == ["from-a"] and fake_b.hits["ack"] == 0


# ---------------------------------------------------------------------------- error statuses


def test_ack_of_an_unknown_id_raises_404(start_fake):
    fake, url = start_fake()
    with fast_client(url) as client, pytest.raises(RefServerError, match="unknown batch_id") as info:
        client.ack("nope", "a-lease")
    assert info.value.status == 404 and fake.hits["ack"] == 1


def test_401_says_to_pass_the_token(start_fake):
    fake, url = start_fake(token="s3cret")
    with fast_client(url) as client:
        assert client.health()["status"] == "ok"  # /health needs no token
        with pytest.raises(RefServerError, match="REF_SERVER_TOKEN") as info:
            client.stats()
    assert info.value.status == 401 and info.value.message == "missing or wrong bearer token"
    assert fake.hits["stats"] == 1  # not retried


def test_token_is_sent_from_the_environment(start_fake, monkeypatch):
    fake, url = start_fake(token="s3cret")
    monkeypatch.setenv("REF_SERVER_TOKEN", "s3cret")
    with fast_client(url) as client:
        assert client.logps(make_batch()).shape == (B, T - P)
        assert "s3cret" not in repr(client)
    assert fake.authorization == ["Bearer s3cret"]


def test_an_explicit_token_wins_over_the_environment(start_fake, monkeypatch):
    fake, url = start_fake(token="right")
    monkeypatch.setenv("REF_SERVER_TOKEN", "wrong")
    with fast_client(url, token="right") as client:
        client.stats()
    assert fake.authorization == ["Bearer right"]


@pytest.mark.parametrize("status", [400, 413, 500])
def test_client_and_model_errors_are_not_retried(start_fake, status):
    fake, url = start_fake()
    fake.logps_answer = json_error(status, "prompt_length 60 exceeds sequence length 10")
    with fast_client(url, max_retries=5) as client, pytest.raises(RefServerError, match="prompt_length 60") as info:
        client.logps(make_batch())
    assert info.value.status == status and info.value.path == "/logps"
    assert fake.hits["logps"] == 1


def test_a_non_json_error_body_still_gives_a_useful_message(start_fake):
    fake, url = start_fake()
    fake.logps_answer = bottle.HTTPResponse("<html>Bad Gateway from some proxy</html>", 502)
    with fast_client(url) as client, pytest.raises(RefServerError, match="Bad Gateway from some proxy") as info:
        client.logps(make_batch())
    assert info.value.status == 502 and "502" in str(info.value)


def test_503_is_retried_in_logps_then_succeeds(start_fake):
    fake, url = start_fake()
    fake.logps_busy, fake.retry_after = 2, None  # no Retry-After: the client's own backoff
    with fast_client(url, max_retries=3) as client:
        assert client.logps(make_batch()).shape == (B, T - P)
    assert fake.hits["logps"] == 3


def test_503_until_retries_run_out_raises(start_fake):
    fake, url = start_fake()
    fake.logps_busy = 10**9
    with fast_client(url, max_retries=3) as client, pytest.raises(RefServerError, match="still busy") as info:
        client.logps(make_batch())
    assert info.value.status == 503 and fake.hits["logps"] == 3


def test_a_slow_answer_raises_timeout_error_without_resending(start_fake):
    fake, url = start_fake()
    fake.logps_delay = 0.5
    with fast_client(url, timeout=0.2) as client, pytest.raises(TimeoutError, match="did not answer within"):
        client.logps(make_batch())
    assert fake.hits["logps"] == 1
    # Let the handler finish before teardown closes the server under it.
    assert fake.logps_done.wait(timeout=5)


def test_close_closes_the_connection_even_while_an_error_is_kept(start_fake):
    fake, url = start_fake()
    client = fast_client(url)
    with pytest.raises(RefServerError) as info:
        client.ack("nope", "a-lease")
    client.close()
    # `info` keeps the traceback, and through it the connection pool, alive; the teardown of
    # start_fake checks that the server saw the connection close all the same.
    assert info.value.status == 404


# ---------------------------------------------------------------------------- dead servers


def test_failover_from_a_dead_url_to_a_live_one(start_fake, monkeypatch):
    fake, live = start_fake()
    dead = f"http://127.0.0.1:{free_port()}"
    requested = []
    send = requests.Session.request

    def recording_send(session, method, url, *args, **kwargs):
        requested.append(url)
        return send(session, method, url, *args, **kwargs)

    monkeypatch.setattr(requests.Session, "request", recording_send)
    with fast_client([dead, live], max_backoff=5.0) as client:
        assert client.logps(make_batch()).shape == (B, T - P)
        client.health()
        client.health()  # dead's turn again, but a URL that just refused is tried last
    assert fake.hits == {"logps": 1, "health": 2}
    assert requested == [dead + "/logps", live + "/logps", live + "/health", live + "/health"]


def test_no_server_raises_connection_error_with_the_start_command_in_bounded_time():
    port = free_port()
    dead = f"http://127.0.0.1:{port}"
    with fast_client(dead, max_retries=4) as client:
        start = time.monotonic()
        with pytest.raises(ConnectionError) as info:
            client.logps(make_batch())
        elapsed = time.monotonic() - start
    message = str(info.value)
    assert dead in message and "tried 4 times" in message
    assert f"python ref_server.py --model_name_or_path MODEL --port {port}" in message
    assert isinstance(info.value.__cause__, requests.ConnectionError)
    assert elapsed < 2


def test_wait_ready_returns_once_a_late_server_comes_up():
    port = free_port()
    fake = FakeRefServer()
    servers = []
    timer = threading.Timer(0.5, lambda: servers.append(LoopbackServer(fake.app, port)))
    timer.start()
    try:
        with fast_client(f"http://127.0.0.1:{port}") as client:
            start = time.monotonic()
            health = client.wait_ready(timeout=10)
            elapsed = time.monotonic() - start
    finally:
        timer.join()
        for server in servers:
            server.close()
    assert health["status"] == "ok"
    assert 0.4 <= elapsed < 5


def test_wait_ready_gives_up_after_its_timeout():
    dead = f"http://127.0.0.1:{free_port()}"
    with fast_client(dead) as client:
        start = time.monotonic()
        with pytest.raises(ConnectionError, match="python ref_server.py") as info:
            client.wait_ready(timeout=0.5)
        elapsed = time.monotonic() - start
    assert dead in str(info.value) and 0.5 <= elapsed < 3


@pytest.mark.parametrize("bad", ["127.0.0.1:59875", "ftp://host:1", [], ["http://ok:1", None]])
def test_malformed_urls_are_rejected_up_front(bad):
    with pytest.raises(ValueError, match="URL"):
        RefServerClient(bad)


# ---------------------------------------------------------------------------- hostile or hung servers


@pytest.mark.parametrize("retry_after", ["nan", "NaN", "inf", "-inf", "-5", "1e300"])
def test_a_nonsense_retry_after_neither_crashes_nor_stalls_the_client(start_fake, retry_after):
    fake, url = start_fake()
    fake.upload_busy = fake.logps_busy = 1
    fake.retry_after = retry_after
    with fast_client(url) as client:
        start = time.monotonic()
        assert client.upload(make_batch(), max_wait=1.0) == {"queued": 1}
        assert client.logps(make_batch()).shape == (B, T - P)  # max_backoff caps the wait here
    assert time.monotonic() - start < 1.5 and fake.hits["upload"] == 2 and fake.hits["logps"] == 2


class HungServer:
    """A loopback port that accepts connections and never answers (a stuck process, a frozen machine)."""

    def __init__(self):
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.accepted.append(conn)  # held open, never read from or written to

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self.accepted:
            conn.close()
        self._listener.close()


def test_failover_from_a_hung_url_costs_the_full_timeout_once_then_only_short_probes(start_fake, monkeypatch):
    fake, live = start_fake()
    hung = HungServer()
    requested = []
    send = requests.Session.request

    def recording_send(session, method, url, *args, **kwargs):
        requested.append(url)
        return send(session, method, url, *args, **kwargs)

    monkeypatch.setattr(requests.Session, "request", recording_send)
    try:
        with fast_client([hung.url, live], timeout=1.5, max_backoff=0.3, probe_timeout=0.2) as client:
            start = time.monotonic()
            assert client.logps(make_batch()).shape == (B, T - P)  # hung first: one full timeout, then live
            first = time.monotonic() - start
            durations = []
            for _ in range(6):
                time.sleep(0.1)  # past max_backoff every few calls: the hung URL is probed again
                start = time.monotonic()
                assert client.logps(make_batch()).shape == (B, T - P)
                durations.append(time.monotonic() - start)
    finally:
        hung.close()
    assert 1.5 <= first < 3
    assert max(durations) < 1.0, durations  # never the full 1.5 s timeout again
    assert fake.hits["logps"] == 7
    to_hung = [u for u in requested if u.startswith(hung.url)]
    assert to_hung[0] == hung.url + "/logps" and len(to_hung) >= 2
    assert all(u == hung.url + "/health" for u in to_hung[1:]), to_hung  # only probes after the timeout


def test_a_read_timeout_on_the_only_url_still_raises_and_the_next_call_probes_first(monkeypatch):
    hung = HungServer()
    try:
        with fast_client(hung.url, timeout=0.5, probe_timeout=0.2, max_retries=2) as client:
            with pytest.raises(TimeoutError, match="did not answer within"):
                client.logps(make_batch())
            start = time.monotonic()
            with pytest.raises(ConnectionError, match="ReadTimeout"):
                client.logps(make_batch())
            assert time.monotonic() - start < 0.5 * 2  # two probes of 0.2 s, not two full timeouts
    finally:
        hung.close()


def test_an_upload_that_timed_out_is_not_resent_to_another_server(start_fake):
    fake, live = start_fake()
    hung = HungServer()
    try:
        with fast_client([hung.url, live], timeout=0.5) as client, pytest.raises(TimeoutError):
            client.upload(make_batch(), max_wait=5)
    finally:
        hung.close()
    assert fake.hits["upload"] == 0  # the hung server may have queued it: a resend could duplicate it
