"""The reference server's HTTP side: a bottle app whose endpoints are the methods of one class.

The endpoints and their answers are listed in `ref_server.py`'s docstring. Every error is a JSON
`{"error": "..."}` with a real status code (DESIGN.md, principle 7) and is counted by kind in
/stats; handlers signal one by raising `HTTPFailure`.
"""

from __future__ import annotations

import collections
import hmac
import json
import logging
import threading
import time

import bottle
import torch

from grpo_split.config.server import MAX_LEASE_SECONDS, TOKEN_ENV, ServerConfig
from grpo_split.contract.batch import FORMAT_VERSION, Batch, BatchTooLarge, WireFormatError, decode_batch, encode_batch
from grpo_split.server.queue import QueuedBatch, QueueFull, RolloutQueue
from grpo_split.server.scorer import ReferenceScorer

# The server's log lines keep the name they have always had, whichever module writes them.
log = logging.getLogger("ref_server")

# How long the upload worker waits for an upload before it looks at its stop flag again: the most
# an idle worker adds to shutdown.
UPLOAD_POLL_SECONDS = 0.5


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
        self.queue = queue or RolloutQueue(config.max_queue)
        self._vocab_size = model_info["vocab_size"]
        self._started = time.time()
        # Waitress threads and the upload worker count at the same time.
        self._counts_lock = threading.Lock()
        self._errors: collections.Counter[str] = collections.Counter()
        self._upload_failures = 0
        self.app = self._build_app()

    def _build_app(self) -> bottle.Bottle:
        app = bottle.Bottle()
        app.route("/logps", "POST", self._endpoint(self.logps))
        app.route("/upload", "POST", self._endpoint(self.upload))
        app.route("/get", "GET", self._endpoint(self.get))
        app.route("/ack/<batch_id>", "POST", self._endpoint(self.ack))
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
        batch = self._read_batch(require_rollout=True)
        try:
            batch_id, depth = self.queue.admit(batch, tokens=batch.batch_size * batch.seq_len)
        except QueueFull as exc:
            raise HTTPFailure(
                503, "queue_full", f"{exc}; retry later", {"Retry-After": str(self.config.retry_after_seconds)}
            ) from exc
        return _reply(202, {"queued": depth, "batch_id": batch_id})

    def get(self):
        entry = self.queue.take(self._requested_lease())
        if entry is None:
            bottle.response.status = 204
            return b""
        return _batch_reply(entry.payload)

    def ack(self, batch_id: str):
        if not self.queue.ack(batch_id):
            raise HTTPFailure(
                404, "not_found", f"no delivered batch {batch_id!r} (never issued, or already acknowledged)"
            )
        return _reply(200, {"acknowledged": batch_id})

    def health(self):
        return _reply(200, {"status": "ok", "format": FORMAT_VERSION, **self.model_info})

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

    def _endpoint(self, handler, needs_auth: bool = True):
        """`handler` behind the token check, with an `HTTPFailure` turned into its JSON answer."""

        def answer(**url_args):
            try:
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
        scheme, _, token = bottle.request.get_header("Authorization", "").partition(" ")
        # compare_digest: the time taken must not tell an attacker how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
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
        log.error("unhandled error on %s %s: %s", bottle.request.method, bottle.request.path, error.exception)
        return _reply(500, {"error": f"internal server error: {error.exception!r}"})

    # ---- reading requests ------------------------------------------------------------------

    def _read_body(self) -> bytes:
        length = bottle.request.content_length
        limit = self.config.max_request_bytes
        if length < 0:
            raise HTTPFailure(411, "bad_request", "send the batch with a Content-Length header")
        if length > limit:
            raise HTTPFailure(
                413, "too_large",
                f"request body of {length} bytes is over the limit of {limit} "
                "(--max_request_mb); send fewer or shorter sequences per request",
            )
        return bottle.request.environ["wsgi.input"].read(length)

    def _read_batch(self, require_rollout: bool) -> Batch:
        try:
            batch = decode_batch(self._read_body(), vocab_size=self._vocab_size,
                                 max_bytes=self.config.max_request_bytes, require_rollout=require_rollout)
        except BatchTooLarge as exc:
            raise HTTPFailure(413, "too_large", str(exc)) from exc
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
        except Exception:  # noqa: BLE001 - one bad batch must not stop the worker; it is logged and counted
            log.exception("could not score uploaded batch %s; it is dropped", entry.batch_id)
            with self._counts_lock:
                self._upload_failures += 1
            self.queue.dropped(entry)
