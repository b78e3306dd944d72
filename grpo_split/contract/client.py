"""HTTP client for the reference server (`ref_server.py`), used by the trainer and the generation workers.

Every call is bounded: a `(connect_timeout, timeout)` pair on each request, at most `max_retries`
attempts per call, and `max_wait` for an upload that keeps meeting a full queue. When no server
answers, the error says which URL was tried and the command that starts the server, where a bare
`except` around the request (as in the public simple_GRPO project this design follows) turns the
same situation into "waiting for batch..." forever.

With several server URLs the client spreads calls round robin and fails over to the next URL on a
connection error or a read timeout (a hung server). Such a URL is marked down: it is tried last for
`max_backoff` seconds, and before it gets a real request again it must answer a short GET /health
(`probe_timeout`), so a dead or hung remote machine costs neither a connect timeout nor the full read
timeout on every other call. An upload that timed out is not resent elsewhere (the hung server may
have queued it); it raises TimeoutError. Acks go to the server that leased the batch, since batch ids
are local to one server's queue.

One client per thread: `requests.Session` is not documented as thread-safe.

    with RefServerClient("http://127.0.0.1:59875") as client:
        client.wait_ready()
        batch.ref_logps = client.logps(batch)  # (B, T-P) float32
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from urllib.parse import quote, urlsplit

import requests
import torch

from grpo_split.contract import DEFAULT_URL, TOKEN_ENV
from grpo_split.contract.batch import Batch, decode_batch, encode_batch

# Never sleep less than this between retries, even when the server says `Retry-After: 0`, so a
# full queue is polled rather than hammered.
MIN_SLEEP = 0.05
# wait_ready polls with short requests so that a server coming up is noticed within about a second.
READY_POLL_TIMEOUT = 1.0
READY_POLL_SLEEP = 0.25
# Batch ids leased by get() and not yet acked, remembered so the ack reaches the leasing server.
# Bounded because a worker that never acks must not grow the client without limit.
MAX_REMEMBERED_LEASES = 4096
BATCH_CONTENT_TYPE = "application/octet-stream"
# The response header of GET /get naming the lease that an ack or dead letter of the batch must carry.
LEASE_HEADER = "X-Lease-Id"
# The longest Retry-After we honour: "inf" or 1e300 would otherwise overflow time.sleep.
MAX_RETRY_AFTER = 3600.0
# A URL marked down (refused, or left a request unanswered) is sent a GET /health with this read
# timeout before it gets a real request again, so a hung server costs this, not the full timeout.
HEALTH_PROBE_TIMEOUT = 2.0


# Polling an empty queue (GET /get answers 204): fast at first, because a batch is usually on its
# way, then one request every 2 s, which keeps an idle trainer's load on the server negligible.
POLL_FIRST_DELAY = 0.05
POLL_MAX_DELAY = 2.0


def backoff_delay(attempt: int, first: float, maximum: float) -> float:
    """Exponential back-off: `first` x 2**attempt seconds, at most `maximum` (attempt counts from 0)."""
    return min(first * 2**attempt, maximum)


def backoff_delays(first: float = POLL_FIRST_DELAY, maximum: float = POLL_MAX_DELAY) -> Iterator[float]:
    """The delays between successive polls: `backoff_delay` for attempts 0, 1, 2, ..."""
    for attempt in itertools.count():
        yield backoff_delay(attempt, first, maximum)


class RefServerError(RuntimeError):
    """The server answered with an error status; .status and .message hold what it said.

    4xx (bad input, auth, too large, unknown id) and 500 (model failure) are raised at once:
    repeating the same request would get the same answer. 503 is raised only once retries ran out.
    """

    def __init__(self, status: int, message: str, *, url: str = "", path: str = ""):
        self.status = status
        self.message = message
        self.url = url
        self.path = path
        super().__init__(f"reference server {url}{path} answered HTTP {status}: {message}{_hint(status)}")


def _hint(status: int) -> str:
    """What the user can do about an error status, appended to the server's own message.

    Only 401 needs one: the fix is on this side (the token), while the server's messages for the
    other statuses already say what to change.
    """
    if status == 401:
        return f" — pass token=... to RefServerClient or set {TOKEN_ENV} to the token the server was started with"
    return ""


def _start_command(url: str) -> str:
    """The command that starts a server listening where `url` points, for error messages."""
    port = urlsplit(url).port or urlsplit(DEFAULT_URL).port
    return f"python ref_server.py --model_name_or_path MODEL --port {port}"


def _normalize_urls(urls: str | Sequence[str]) -> list[str]:
    """One URL or several -> a list without trailing slashes; a malformed URL is an error now, not at first use."""
    url_list = [urls] if isinstance(urls, str) else list(urls)
    if not url_list:
        raise ValueError("RefServerClient needs at least one server URL, e.g. " + DEFAULT_URL)
    normalized = []
    for url in url_list:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"reference server URL must look like {DEFAULT_URL}, got {url!r}")
        normalized.append(url.rstrip("/"))
    return normalized


def _retry_after(response: requests.Response) -> float | None:
    """Seconds from a numeric `Retry-After` header, or None (absent, or an HTTP date we do not parse)."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if math.isnan(seconds):  # float() accepts "nan", and time.sleep(nan) raises
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _error_message(response: requests.Response) -> str:
    """The server's JSON `error` string, or the status and the start of whatever else it sent."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"]
    text = response.text[:200]
    return f"{response.status_code} {response.reason or ''} (not a JSON error body): {text!r}"


class RefServerClient:
    """Talks to one or several reference servers; see the module docstring for the retry rules."""

    def __init__(
        self,
        urls: str | Sequence[str] = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = 300.0,
        connect_timeout: float = 5.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        probe_timeout: float = HEALTH_PROBE_TIMEOUT,
    ):
        self.urls = _normalize_urls(urls)
        if max_retries < 1:
            raise ValueError(f"max_retries is the number of attempts per call and must be >= 1, got {max_retries}")
        if timeout <= 0 or connect_timeout <= 0 or probe_timeout <= 0:
            raise ValueError(f"timeouts must be > 0, got timeout={timeout}, connect_timeout={connect_timeout}, "
                             f"probe_timeout={probe_timeout}")
        if backoff < 0 or max_backoff < 0:
            raise ValueError(f"backoff and max_backoff must be >= 0, got {backoff} and {max_backoff}")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.probe_timeout = min(probe_timeout, timeout)
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self._session = requests.Session()
        if self.token:
            self._session.headers["Authorization"] = f"Bearer {self.token}"
        self._turn = itertools.count()
        self._down_until: dict[str, float] = {}
        self._suspect: set[str] = set()  # marked down and not yet seen answering /health again
        self._leases: OrderedDict[str, str] = OrderedDict()

    def __repr__(self) -> str:
        # The token is deliberately left out: reprs end up in logs.
        return f"RefServerClient(urls={self.urls!r}, token={'set' if self.token else 'unset'})"

    def __enter__(self) -> RefServerClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections now.

        `Session.close()` alone leaves idle sockets open for as long as anything (an exception's
        traceback kept in a log, say) still references their pool: urllib3 2 closes a pool's
        connections only when the pool is garbage collected, and the server keeps the other end open.
        """
        for adapter in self._session.adapters.values():
            manager = getattr(adapter, "poolmanager", None)
            if manager is None:
                continue
            for key in list(manager.pools.keys()):
                pool = manager.pools.get(key)
                if pool is not None:
                    pool.close()
        self._session.close()

    # ------------------------------------------------------------------ public calls

    def wait_ready(self, timeout: float = 60.0) -> dict:
        """Poll /health on every URL until one answers 200; return its JSON. ConnectionError after `timeout` s.

        Meant for start-up, when the server may still be loading its model: unlike the other calls
        it keeps polling for the whole `timeout` instead of giving up after `max_retries` attempts.
        """
        start = time.monotonic()
        deadline = start + timeout
        attempts = 0
        last_exc: Exception | None = None
        last_problem = "no answer"
        while True:
            for url in self.urls:
                per_request = max(MIN_SLEEP, min(READY_POLL_TIMEOUT, deadline - time.monotonic()))
                attempts += 1
                try:
                    response = self._session.get(url + "/health", timeout=(per_request, per_request))
                except requests.RequestException as exc:
                    last_exc, last_problem = exc, f"{url}: {type(exc).__name__}"
                    continue
                if response.status_code == 200:
                    self._mark_up(url)
                    return self._json(response, url, "/health")
                last_problem = f"{url}/health answered HTTP {response.status_code}: {_error_message(response)}"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionError(
                    f"no reference server ready at {', '.join(self.urls)} within {timeout:g} s ({attempts} attempts, "
                    f"last: {last_problem}) — start it with: {_start_command(self.urls[0])}"
                ) from last_exc
            time.sleep(min(READY_POLL_SLEEP, remaining))

    def health(self) -> dict:
        """GET /health: status, model, vocab_size, device, dtype and wire format of one server."""
        url, response = self._request("GET", "/health")
        return self._json(response, url, "/health")

    def stats(self) -> dict:
        """GET /stats: the server's counters (requests, queue depth, timings)."""
        url, response = self._request("GET", "/stats")
        return self._json(response, url, "/stats")

    def logps(self, batch: Batch) -> torch.Tensor:
        """POST the batch to /logps; return the reference per-token log-probs, (B, T-P) float32."""
        url, response = self._request("POST", "/logps", data=encode_batch(batch))
        scored = decode_batch(response.content)
        expected = (batch.input_ids.shape[0], batch.input_ids.shape[1] - batch.prompt_length)
        ref_logps = scored.ref_logps
        if ref_logps is None or tuple(ref_logps.shape) != expected:
            got = None if ref_logps is None else tuple(ref_logps.shape)
            raise RefServerError(
                response.status_code,
                f"expected ref_logps of shape {expected} (B, T-P) in the answer, got {got}; "
                "is the server running the same wire format version as this client?",
                url=url,
                path="/logps",
            )
        return ref_logps

    def upload(self, batch: Batch, *, max_wait: float = 600.0, upload_id: str | None = None) -> dict:
        """POST the batch to /upload; return the server's JSON (`queued`: queue depth, `batch_id`).

        A full queue (503) is retried, sleeping what `Retry-After` says, for at most `max_wait`
        seconds; then TimeoutError. Each retry goes to the next URL, which may have room.
        Every attempt carries `upload_id` (a fresh one by default; pass the same one when calling
        again for the same batch), so a server that stored the batch but whose 202 was lost answers
        the resend with the first batch_id (`duplicate`: true) instead of queueing it twice.
        """
        body = encode_batch(batch)
        params = {"upload_id": upload_id or uuid.uuid4().hex}
        start = time.monotonic()
        deadline = start + max_wait
        busy = 0
        while True:
            url, response = self._request("POST", "/upload", data=body, params=params, retry_busy=False,
                                          resend_on_timeout=False)
            if response.status_code != 503:
                return self._json(response, url, "/upload")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"reference server queue stayed full for {time.monotonic() - start:.1f} s ({busy + 1} upload "
                    f"attempts, max_wait={max_wait:g} s; last answer from {url}: {_error_message(response)}) — the "
                    "trainer is not consuming batches fast enough: check that it is running, or raise max_wait or "
                    "the server's queue size"
                )
            delay = _retry_after(response)
            if delay is None:
                delay = self._backoff_delay(busy)
            time.sleep(min(max(delay, MIN_SLEEP), remaining))
            busy += 1

    def get(self, *, lease_seconds: float | None = None) -> Batch | None:
        """GET /get: a scored batch or None when none is ready. The batch's `batch_id` and `lease` (the
        server's X-Lease-Id) are what `ack` or `dead_letter` of it must name.

        With `lease_seconds`, the server hands the batch out again if it is not acked in time.
        """
        params = None if lease_seconds is None else {"lease": f"{lease_seconds:g}"}
        url, response = self._request("GET", "/get", params=params)
        if response.status_code == 204:
            return None
        batch = decode_batch(response.content)
        batch.lease = response.headers.get(LEASE_HEADER)
        if batch.batch_id is None or not batch.lease:
            raise RefServerError(
                response.status_code, f"GET /get answered a batch without a batch_id or {LEASE_HEADER} header; is "
                "the server running the same version as this client?", url=url, path="/get",
            )
        self._leases[batch.batch_id] = url
        while len(self._leases) > MAX_REMEMBERED_LEASES:
            self._leases.popitem(last=False)
        return batch

    def ack(self, batch_id: str, lease: str) -> None:
        """POST /ack/<batch_id>?lease=<lease>: the batch is consumed. RefServerError 409 when `lease` no
        longer holds it (it ran out and the batch went to another consumer, or it was dead-lettered),
        404 when the server does not know the id (e.g. it restarted without --queue_dir).

        Sent to the server that leased the batch (no failover: another server cannot know the id).
        """
        self._settle("/ack/", batch_id, lease, params={"lease": lease})

    def dead_letter(self, batch_id: str, lease: str, reason: str) -> None:
        """POST /dead/<batch_id>: settle a leased batch this consumer cannot use as a dead letter with
        `reason` (shown in the server's /stats and log); never delivered again. Errors as for `ack`."""
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError("dead_letter needs a reason: say why the batch cannot be used")
        self._settle("/dead/", batch_id, lease, data=json.dumps({"lease": lease, "reason": reason}).encode())

    def _settle(self, path: str, batch_id: str, lease: str, **request) -> None:
        if not isinstance(batch_id, str) or not batch_id:
            raise ValueError(f"settling a batch needs the batch_id string of a batch from get(), got {batch_id!r}")
        if not isinstance(lease, str) or not lease:
            raise ValueError(f"settling batch {batch_id} needs the lease string of the batch from get(), got {lease!r}")
        leased_from = self._leases.get(batch_id)
        urls = [leased_from] if leased_from is not None else None
        self._request("POST", path + quote(batch_id, safe=""), urls=urls, **request)
        # Forgotten only once settled, so a retry after a connection error still reaches the leasing server.
        self._leases.pop(batch_id, None)

    # ------------------------------------------------------------------ internals

    def _backoff_delay(self, attempt: int) -> float:
        return backoff_delay(attempt, self.backoff, self.max_backoff)

    def _candidates(self) -> list[str]:
        """URLs in this call's order: round robin from the next turn, URLs that recently failed moved last."""
        first = next(self._turn) % len(self.urls)
        rotated = self.urls[first:] + self.urls[:first]
        now = time.monotonic()
        return sorted(rotated, key=lambda url: self._down_until.get(url, 0.0) > now)  # stable sort keeps the turn

    def _request(
        self,
        method: str,
        path: str,
        *,
        data: bytes | None = None,
        params: dict | None = None,
        urls: list[str] | None = None,
        retry_busy: bool = True,
        resend_on_timeout: bool = True,
    ) -> tuple[str, requests.Response]:
        """Send one request with failover and retries; return (base URL that answered, 2xx response).

        Connection errors move to the next URL (sleeping with exponential backoff once every URL has
        failed); 503 is retried after `Retry-After` (capped at max_backoff) when `retry_busy`, else
        returned to the caller. 4xx and 500 raise RefServerError at once. A read timeout marks the
        URL down and moves to another URL when there is one and `resend_on_timeout`; otherwise it
        raises TimeoutError (resending to the same server would double the wait). A URL marked down
        must answer a GET /health within `probe_timeout` before it is sent the request.
        """
        candidates = urls if urls is not None else self._candidates()
        headers = {"Content-Type": BATCH_CONTENT_TYPE} if data is not None else None
        start = time.monotonic()
        last_exc: Exception | None = None
        busy: tuple[str, requests.Response] | None = None
        failures = 0
        for attempt in range(self.max_retries):
            url = candidates[attempt % len(candidates)]
            if url in self._suspect:
                probe_failure = self._probe(url)
                if probe_failure is not None:
                    last_exc, busy = probe_failure, None
                    failures += 1
                    if attempt + 1 < self.max_retries and failures % len(candidates) == 0:
                        time.sleep(self._backoff_delay(failures // len(candidates) - 1))
                    continue
            try:
                response = self._session.request(
                    method,
                    url + path,
                    data=data,
                    params=params,
                    headers=headers,
                    timeout=(self.connect_timeout, self.timeout),
                )
            except requests.ConnectionError as exc:  # includes ConnectTimeout
                last_exc, busy = exc, None
                self._mark_down(url)
                failures += 1
                if attempt + 1 < self.max_retries and failures % len(candidates) == 0:
                    time.sleep(self._backoff_delay(failures // len(candidates) - 1))
                continue
            except requests.Timeout as exc:  # a read timeout: connected, but no answer in time
                # Down like a refused connection: the next calls go elsewhere, and this URL is probed
                # with a short /health before it gets a request again.
                self._mark_down(url)
                if not resend_on_timeout or len(set(candidates)) == 1 or attempt + 1 == self.max_retries:
                    raise TimeoutError(
                        f"reference server {url}{path} did not answer within timeout={self.timeout:g} s — it may be "
                        "overloaded or stuck; check its log, or raise the client's timeout"
                    ) from exc
                last_exc, busy = exc, None
                failures += 1
                continue
            self._mark_up(url)
            if response.status_code == 503:
                if not retry_busy:
                    return url, response
                busy = (url, response)
                if attempt + 1 < self.max_retries:
                    delay = _retry_after(response)
                    delay = self._backoff_delay(attempt) if delay is None else min(delay, self.max_backoff)
                    time.sleep(max(delay, MIN_SLEEP))
                continue
            if response.status_code >= 400:
                raise RefServerError(response.status_code, _error_message(response), url=url, path=path)
            return url, response
        if busy is not None:
            url, response = busy
            message = f"{_error_message(response)} (still busy after {self.max_retries} attempts)"
            raise RefServerError(503, message, url=url, path=path)
        tried = ", ".join(dict.fromkeys(candidates))
        raise ConnectionError(
            f"no reference server at {tried} (tried {self.max_retries} times over {time.monotonic() - start:.1f} s, "
            f"last: {type(last_exc).__name__}) — start it with: {_start_command(candidates[0])}"
        ) from last_exc

    def _mark_down(self, url: str) -> None:
        self._down_until[url] = time.monotonic() + self.max_backoff
        self._suspect.add(url)

    def _mark_up(self, url: str) -> None:
        self._down_until.pop(url, None)
        self._suspect.discard(url)

    def _probe(self, url: str) -> Exception | None:
        """GET /health on a URL marked down, with a short read timeout; None when it answered 200."""
        try:
            response = self._session.get(url + "/health", timeout=(self.connect_timeout, self.probe_timeout))
        except requests.RequestException as exc:
            self._mark_down(url)
            return exc
        if response.status_code != 200:
            self._mark_down(url)
            return requests.ConnectionError(f"{url}/health answered HTTP {response.status_code} to the probe")
        self._mark_up(url)
        return None

    def _json(self, response: requests.Response, url: str, path: str) -> dict:
        """The JSON object of a success response; anything else means the URL is not a reference server."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise RefServerError(
                response.status_code,
                f"expected a JSON object, got {response.headers.get('Content-Type')!r}: {response.text[:200]!r}; "
                "is this URL a reference server?",
                url=url,
                path=path,
            )
        return body
