"""The reference server's HTTP side: a bottle app whose endpoints are the methods of one class.

The endpoints and their answers are listed in `ref_server.py`'s docstring. Every error is a JSON
`{"error": "..."}` with a real status code (DESIGN.md, principle 7) and is counted by kind in
/stats; handlers signal one by raising `HTTPFailure`.
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import ipaddress
import json
import logging
import re
import threading
import time

import bottle
import torch

from grpo_split.config.server import MAX_LEASE_SECONDS, TOKEN_ENV, ServerConfig
from grpo_split.contract.batch import FORMAT_VERSION, Batch, BatchTooLarge, WireFormatError, decode_batch, encode_batch
from grpo_split.server.queue import QueuedBatch, QueueFull, RolloutQueue, StaleLease, UnknownBatch
from grpo_split.server.scorer import ReferenceScorer

# The server's log lines keep the name they have always had, whichever module writes them.
log = logging.getLogger("ref_server")

# Dead-letter reasons are cut to this many characters: they come from clients and end up in /stats and logs.
MAX_REASON_CHARS = 500
# The response header of GET /get that carries the lease id an ack or dead letter must name.
LEASE_HEADER = "X-Lease-Id"
# POST /upload?upload_id=...: the uploader's id of one upload, the same on every resend of it.
UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")

# How long the upload worker waits for an upload before it looks at its stop flag again: the most
# an idle worker adds to shutdown.
UPLOAD_POLL_SECONDS = 0.5


# The content types a web page may POST cross-site without a CORS preflight (the Fetch standard's
# CORS-safelisted request headers); refused when no token is set.
_BROWSER_SIMPLE_CONTENT_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _allowed_host(host_header: str, bound_host: str) -> bool:
    """Whether a Host header names this server without a DNS name a web page could rebind: an IP
    literal (any port), localhost, or the --host it was started with."""
    name = host_header.strip().lower()
    if name.startswith("["):  # [v6]:port
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name in _LOOPBACK_NAMES or name == bound_host.lower().strip("[]"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HTTPFailure(Exception):
    """An error answer: status, message, and the `errors` counter it is recorded under."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


def _reply(status: int, body: dict, headers: dict[str, str] | None = None) -> str:
    bottle.response.status = status
    bottle.response.content_type = "application/json"
    for key, value in (headers or {}).items():
        bottle.response.set_header(key, value)
    return json.dumps(body)


def _batch_reply(payload: bytes) -> bytes:
    bottle.response.content_type = "application/octet-stream"
    return payload


class ReferenceServerApp:
    """The HTTP endpoints over a scorer and the upload queue; `.app` is the WSGI app to serve.

    `model_info` is what /health reports: model, vocab_size, device, dtype. Uploaded batches are
    scored by the thread that `start_upload_worker` starts.
    """

    def __init__(
        self, scorer: ReferenceScorer, config: ServerConfig, model_info: dict, queue: RolloutQueue | None = None
    ):
        self.scorer = scorer
        self.config = config
        self.model_info = model_info
        self.queue = queue or RolloutQueue(config.max_queue, max_deliveries=config.max_deliveries)
        self.queue.on_dead_letter = self._log_dead_letter
        self._vocab_size = model_info["vocab_size"]
        self._started = time.time()
        # Waitress threads and the upload worker count at the same time.
        self._counts_lock = threading.Lock()
        self._errors: collections.Counter[str] = collections.Counter()
        self._upload_failures = 0
        self._inflight_bytes = 0  # request bodies being read and decoded now (--max_inflight_request_mb)
        self.app = self._build_app()

    def _build_app(self) -> bottle.Bottle:
        app = bottle.Bottle()
        app.route("/logps", "POST", self._endpoint(self.logps))
        app.route("/upload", "POST", self._endpoint(self.upload))
        app.route("/get", "GET", self._endpoint(self.get))
        app.route("/ack/<batch_id>", "POST", self._endpoint(self.ack))
        app.route("/dead/<batch_id>", "POST", self._endpoint(self.dead))
        app.route("/health", "GET", self._endpoint(self.health, needs_auth=False))
        app.route("/stats", "GET", self._endpoint(self.stats))
        app.error(404)(self._not_found)
        app.error(405)(self._method_not_allowed)
        app.error(500)(self._internal_error)
        return app

    # ---- the endpoints ---------------------------------------------------------------------

    def logps(self):
        batch = self._read_batch(require_rollout=False)
        batch.ref_logps = self._score(batch)
        return _batch_reply(encode_batch(batch))

    def upload(self):
        upload_id = bottle.request.query.get("upload_id")
        if upload_id is not None and not UPLOAD_ID.fullmatch(upload_id):
            raise HTTPFailure(400, "bad_request", "upload_id: must be 1..128 characters of [A-Za-z0-9_-]")
        batch = self._read_batch(require_rollout=True)
        try:
            # A durable queue stores the batch's bytes before the 202; re-encoded, as the body is not kept.
            payload = encode_batch(batch) if self.queue.durable else None
            batch_id, depth, new = self.queue.admit(batch, tokens=batch.batch_size * batch.seq_len, payload=payload,
                                                    upload_id=upload_id)
        except QueueFull as exc:
            raise HTTPFailure(
                503, "queue_full", f"{exc}; retry later", {"Retry-After": str(self.config.retry_after_seconds)}
            ) from exc
        return _reply(202, {"queued": depth, "batch_id": batch_id, **({} if new else {"duplicate": True})})

    def get(self):
        if bottle.request.method == "HEAD":  # bottle routes HEAD here; a HEAD answer has no body, so lease nothing
            bottle.response.status = 200 if self.queue.ready_count() else 204
            return b""
        entry = self.queue.take(self._requested_lease())
        if entry is None:
            bottle.response.status = 204
            return b""
        bottle.response.set_header(LEASE_HEADER, entry.lease)
        return _batch_reply(entry.payload)

    def ack(self, batch_id: str):
        lease = bottle.request.query.get("lease")
        if not lease:
            raise HTTPFailure(400, "bad_request", f"send the lease this ack settles: POST /ack/<id>?lease=<the "
                                                  f"{LEASE_HEADER} header of GET /get>")
        with self._settling(batch_id):
            first = self.queue.ack(batch_id, lease)
        return _reply(200, {"acknowledged": batch_id, **({} if first else {"repeated": True})})

    def dead(self, batch_id: str):
        """A consumer settles a batch it cannot use: JSON body {"lease": ..., "reason": ...}."""
        expected = 'body must be JSON {"lease": "<the X-Lease-Id of GET /get>", "reason": "<why it cannot be used>"}'
        try:
            body = json.loads(self._read_body() or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPFailure(400, "bad_request", f"{expected}; got invalid JSON: {exc}") from exc
        if not (isinstance(body, dict) and isinstance(body.get("lease"), str) and body["lease"]
                and isinstance(body.get("reason"), str) and body["reason"].strip()):
            raise HTTPFailure(400, "bad_request", expected)
        reason = body["reason"].strip()[:MAX_REASON_CHARS]
        with self._settling(batch_id):
            self.queue.dead_letter(batch_id, body["lease"], f"consumer: {reason}")
        return _reply(200, {"dead_lettered": batch_id})

    def health(self):
        return _reply(200, {"status": "ok", "format": FORMAT_VERSION, **self.model_info,
                            "max_request_tokens": self.config.max_request_tokens})

    def stats(self):
        scorer = self.scorer.stats()
        with self._counts_lock:
            upload_failures, errors = self._upload_failures, dict(self._errors)
        return _reply(200, {
            **self.queue.stats(),
            "batches_processed": scorer.batches,
            "tokens_processed": scorer.tokens,
            "forward_passes": scorer.forwards,
            "tokens_per_second": scorer.tokens_per_second,
            "uptime_seconds": time.time() - self._started,
            "upload_failures": upload_failures,
            "errors": errors,
        })

    # ---- the error contract ----------------------------------------------------------------

    @staticmethod
    @contextlib.contextmanager
    def _settling(batch_id: str):
        """The queue's settlement errors as answers: 409 for a lease that does not hold the batch, 404 for
        an unknown id."""
        try:
            yield
        except StaleLease as exc:
            raise HTTPFailure(409, "stale_lease", str(exc)) from exc
        except UnknownBatch as exc:
            raise HTTPFailure(404, "not_found", str(exc)) from exc

    def _log_dead_letter(self, batch_id: str, reason: str) -> None:
        log.warning("batch %s is dead-lettered: %s", batch_id, reason)

    def _endpoint(self, handler, needs_auth: bool = True):
        """`handler` behind the token check, with an `HTTPFailure` turned into its JSON answer."""

        def answer(**url_args):
            try:
                if self.config.auth_token is None:
                    self._check_browser_safety()
                if needs_auth:
                    self._check_auth()
                return handler(**url_args)
            except HTTPFailure as failure:
                self._count_error(failure.kind)
                return _reply(failure.status, {"error": failure.message}, failure.headers)

        return answer

    def _check_auth(self) -> None:
        expected = self.config.auth_token
        if expected is None:
            return
        # The raw header: WSGI hands it over as latin-1 text, which maps back to the bytes sent, where
        # bottle's get_header decodes it as UTF-8 and raises (a 500) on any other byte.
        header = bottle.request.environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        scheme, _, token = header.partition(b" ")
        # compare_digest: the time taken must not tell an attacker how much of a guess was right.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token, expected.encode()):
            raise HTTPFailure(
                401, "unauthorized", f"missing or wrong token: send 'Authorization: Bearer <token>' ({TOKEN_ENV})"
            )

    def _count_error(self, kind: str) -> None:
        with self._counts_lock:
            self._errors[kind] += 1

    def _not_found(self, error):
        self._count_error("not_found")
        return _reply(404, {"error": f"no endpoint {bottle.request.method} {bottle.request.path}; see GET /health"})

    def _method_not_allowed(self, error):
        self._count_error("bad_request")
        return _reply(405, {"error": f"{bottle.request.method} is not allowed on {bottle.request.path}"})

    def _internal_error(self, error):
        self._count_error("server_error")
        log.error("unhandled error on %s %s: %r", bottle.request.method, bottle.request.path, error.exception)
        # The exception's text stays in the log: it may hold anything, including what the client sent.
        return _reply(500, {"error": f"internal server error ({type(error.exception).__name__}); see the server log"})

    def count_error(self, kind: str) -> None:
        """Count an error answered outside the app (by the HTTP server: malformed requests, deadlines)."""
        self._count_error(kind)

    def body_too_large_message(self, length: int) -> str:
        return (f"request body of {length} bytes is over the limit of {self.config.max_body_bytes} bytes "
                f"(--max_request_tokens={self.config.max_request_tokens} tokens, --max_request_mb="
                f"{self.config.max_request_mb:g}); send fewer or shorter sequences per request")

    def _check_browser_safety(self) -> None:
        """Without a token, refuse what only a web page would send: DNS rebinding and cross-site simple POSTs.

        A page on another site can make a browser POST here without asking first (no CORS preflight)
        only with one of three content types, and can reach this port through a DNS name that it
        rebinds to 127.0.0.1; our clients send neither. With a token none of this matters: a page
        cannot know it.
        """
        host = bottle.request.environ.get("HTTP_HOST")
        if host is not None and not _allowed_host(host, self.config.host):
            raise HTTPFailure(
                421, "misdirected",
                f"Host {host[:100]!r} is not this server's address: without --auth_token only requests to an IP "
                f"address, localhost or --host ({self.config.host}) are answered (a web page reaching this port "
                "through another DNS name is refused); connect by IP address, or start the server with --auth_token",
            )
        if bottle.request.method == "POST":
            content_type = bottle.request.environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
            if content_type in _BROWSER_SIMPLE_CONTENT_TYPES:
                raise HTTPFailure(
                    415, "bad_request",
                    f"Content-Type {content_type} is refused (a web page can send it cross-site); send batches as "
                    "application/octet-stream (or with no Content-Type)",
                )

    # ---- reading requests ------------------------------------------------------------------

    def _read_body(self) -> bytes:
        length = bottle.request.content_length
        if length < 0:
            raise HTTPFailure(411, "bad_request", "send the batch with a Content-Length header")
        if length > self.config.max_body_bytes:  # the HTTP server already refuses these; in-process apps may not
            raise HTTPFailure(413, "too_large", self.body_too_large_message(length))
        return bottle.request.environ["wsgi.input"].read(length)

    @contextlib.contextmanager
    def _inflight_budget(self, length: int):
        """Admit a body of `length` bytes to be read and decoded while others are, within
        --max_inflight_request_mb (one alone always), or 503 + Retry-After: memory stays bounded
        however many large requests arrive at once."""
        with self._counts_lock:
            budget = self.config.max_inflight_request_bytes
            admitted = self._inflight_bytes == 0 or self._inflight_bytes + length <= budget
            if admitted:
                self._inflight_bytes += length
        if not admitted:
            raise HTTPFailure(
                503, "busy",
                f"{self.config.max_inflight_request_mb:g} MB of requests are being read already "
                "(--max_inflight_request_mb); retry later",
                {"Retry-After": str(max(1, self.config.retry_after_seconds))},
            )
        try:
            yield
        finally:
            with self._counts_lock:
                self._inflight_bytes -= length

    def _read_batch(self, require_rollout: bool) -> Batch:
        try:
            with self._inflight_budget(max(bottle.request.content_length, 0)):
                batch = decode_batch(self._read_body(), vocab_size=self._vocab_size,
                                     max_bytes=self.config.max_body_bytes, max_tokens=self.config.max_request_tokens,
                                     require_rollout=require_rollout)
        except BatchTooLarge as exc:
            raise HTTPFailure(
                413, "too_large",
                f"{exc} (limits: --max_request_tokens={self.config.max_request_tokens} tokens, "
                f"bodies of {self.config.max_body_bytes} bytes)",
            ) from exc
        except WireFormatError as exc:
            raise HTTPFailure(400, "bad_request", str(exc)) from exc
        if batch.seq_len > self.config.max_batch_tokens:
            raise HTTPFailure(
                413, "too_large",
                f"sequences of {batch.seq_len} tokens do not fit one micro-batch of max_batch_tokens="
                f"{self.config.max_batch_tokens}; restart the server with a larger --max_batch_tokens",
            )
        return batch

    def _requested_lease(self) -> float:
        text = bottle.request.query.get("lease")
        if text is None:
            return self.config.lease_seconds
        try:
            lease = float(text)
        except ValueError as exc:
            raise HTTPFailure(400, "bad_request", f"lease must be a number of seconds, got {text!r}") from exc
        if not 0 < lease <= MAX_LEASE_SECONDS:
            raise HTTPFailure(400, "bad_request", f"lease must be in (0, {MAX_LEASE_SECONDS:g}] seconds")
        return lease

    def _score(self, batch: Batch) -> torch.Tensor:
        try:
            return self.scorer.score(batch)
        except (RuntimeError, ValueError) as exc:
            raise HTTPFailure(500, "model_error", f"reference model failed: {exc}") from exc

    # ---- the upload worker -----------------------------------------------------------------

    def start_upload_worker(self, stop: threading.Event) -> threading.Thread:
        """Start the thread that scores uploaded batches in arrival order and makes them
        deliverable; it ends within `UPLOAD_POLL_SECONDS` of `stop` being set (after the batch in hand)."""
        thread = threading.Thread(target=self._score_uploads, args=(stop,), name="upload-scorer", daemon=True)
        thread.start()
        return thread

    def _score_uploads(self, stop: threading.Event) -> None:
        while not stop.is_set():
            entry = self.queue.next_to_score(timeout=UPLOAD_POLL_SECONDS)
            if entry is not None:
                self._score_upload(entry)

    def _score_upload(self, entry: QueuedBatch) -> None:
        batch: Batch = entry.item
        try:
            batch.ref_logps = self.scorer.score(batch)
            batch.batch_id = entry.batch_id
            self.queue.scored(entry, encode_batch(batch))
        except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the worker; it is dead-lettered
            log.exception("could not score uploaded batch %s", entry.batch_id)
            with self._counts_lock:
                self._upload_failures += 1
            self.queue.failed(entry, f"scoring failed: {type(exc).__name__}: {str(exc)[:MAX_REASON_CHARS]}")
