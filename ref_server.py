"""Reference-model server: the frozen initial policy behind HTTP, so it needs no room on the training GPUs.

    python ref_server.py --model_name_or_path Qwen/Qwen2.5-7B-Instruct --device cuda:0
    python ref_server.py --config configs/ref_server.yaml --port 8000
    REF_SERVER_TOKEN=secret python ref_server.py --model_name_or_path PATH --host 0.0.0.0

Endpoints (batches are `grpo_common.wire` bytes; everything else is JSON):
    POST /logps          a batch -> the same batch with `ref_logps` (B, T-P); concurrent requests are coalesced
    POST /upload         a generation worker's scored rollout batch -> 202 {queued}; 503 + Retry-After when full
    GET  /get?lease=S    the oldest batch with reference log-probs and a `batch_id`; 204 when none is ready
    POST /ack/<id>       settle a delivered batch; unacknowledged batches are delivered again after their lease
    GET  /health         status, model, vocab size, device, dtype, wire format (never needs the token)
    GET  /stats          queue depths, batches and tokens processed, tokens/s, errors by kind
Errors are JSON `{"error": "..."}` with 400 (bad input), 401, 404, 411, 413, 503 (+ Retry-After) or 500.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

import bottle
import torch

from grpo_common.rollout_queue import QueueFull, RolloutQueue
from grpo_common.wire import FORMAT_VERSION, Batch, BatchTooLarge, WireFormatError, decode_batch, encode_batch

log = logging.getLogger("ref_server")

DEFAULT_PORT = 59875
MAX_LEASE_SECONDS = 24 * 3600.0


@dataclass
class ServerConfig:
    model_name_or_path: str = field(metadata={"help": "reference model: a local directory or a hub name"})
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "interface to bind; 0.0.0.0 exposes the server to the network (set --auth_token then)"},
    )
    port: int = field(default=DEFAULT_PORT, metadata={"help": "TCP port; 0 picks a free one (printed when ready)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when present, else cpu), cpu, cuda, cuda:1, ..."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "weights dtype; auto = bfloat16 on a GPU that supports it, else float32"}
    )
    max_batch_tokens: int = field(
        default=16384, metadata={"help": "token budget (rows x sequence length) of one forward micro-batch"}
    )
    max_queue: int = field(
        default=64, metadata={"help": "uploaded batches held at most (awaiting scoring or delivery)"}
    )
    max_request_mb: float = field(default=256.0, metadata={"help": "request bodies above this many MB get 413"})
    auth_token: str | None = field(
        default=None,
        metadata={"help": "bearer token every request but /health must carry (default: env REF_SERVER_TOKEN)"},
    )
    lease_seconds: float = field(
        default=300.0, metadata={"help": "default lease of GET /get: unacknowledged batches are delivered again after"}
    )
    threads: int = field(default=8, metadata={"help": "HTTP worker threads (waitress)"})
    retry_after_seconds: int = field(default=2, metadata={"help": "Retry-After sent with 503 when the queue is full"})

    def __post_init__(self):
        if self.auth_token is None:
            self.auth_token = os.environ.get("REF_SERVER_TOKEN") or None
        checks = {
            "port": 0 <= self.port <= 65535,
            "max_batch_tokens": self.max_batch_tokens >= 1,
            "max_queue": self.max_queue >= 1,
            "max_request_mb": self.max_request_mb > 0,
            "lease_seconds": 0 < self.lease_seconds <= MAX_LEASE_SECONDS,
            "threads": self.threads >= 1,
            "retry_after_seconds": self.retry_after_seconds >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range; see --help")

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1e6)


class HTTPFailure(Exception):
    """An error answer: status, message, and the `errors` counter it is recorded under."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


# ---- the model side: one thread runs every forward, coalescing concurrent requests -------------


@dataclass
class _Request:
    batch: Batch
    future: Future
    tokens: int


def _pad_and_concat(batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack batches of different prompt/completion lengths into one: prompts left-padded to the
    longest prompt, completions right-padded to the longest completion, padding masked out.

    Left padding with position ids counted from the mask, and right padding behind a causal
    mask, leave every real token's log-prob unchanged (up to float rounding).
    """
    prompt_len = max(b.prompt_length for b in batches)
    completion_len = max(b.completion_length for b in batches)
    ids, masks = [], []
    for b in batches:
        mask = b.attention_mask if b.attention_mask is not None else torch.ones_like(b.input_ids)
        pad_left = prompt_len - b.prompt_length
        pad_right = completion_len - b.completion_length
        ids.append(torch.nn.functional.pad(b.input_ids, (pad_left, pad_right)))
        masks.append(torch.nn.functional.pad(mask.long(), (pad_left, pad_right)))
    return torch.cat(ids), torch.cat(masks), prompt_len  # (sum B, P + C) twice


class ReferenceScorer:
    """Owns the frozen model. `score` may be called from any thread; one worker thread runs the
    forwards, packing waiting requests into micro-batches of at most `max_batch_tokens`."""

    def __init__(self, model, max_batch_tokens: int, compute=None):
        from grpo_common.modeling import lm_head_plan, reference_logps

        if compute is None:
            lm_head_plan(model)  # checked (and cached) here, not in the worker while the first requests wait
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self._compute = compute or (
            lambda ids, mask, p, temp: reference_logps(self.model, ids, mask, p, temp, max_batch_tokens)
        )
        self._waiting: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._stopped = False
        self.tokens = 0
        self.batches = 0
        self.forwards = 0
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="reference-forward", daemon=True)
        self._thread.start()

    def score(self, batch: Batch) -> torch.Tensor:
        """Reference log-probs (B, T-P) of `batch`; raises what the model raised."""
        request = _Request(batch, Future(), batch.batch_size * batch.seq_len)
        with self._cond:
            if self._stopped:
                raise RuntimeError("the reference server is shutting down")
            self._waiting.append(request)
            self._cond.notify()
        return request.future.result()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _next_group(self) -> list[_Request] | None:
        with self._cond:
            while not self._waiting and not self._stopped:
                self._cond.wait()
            if self._stopped and not self._waiting:
                return None
            group = [self._waiting.popleft()]
            # Pack more waiting requests (same temperature) while the padded total fits the budget.
            while self._waiting:
                candidate = self._waiting[0]
                if candidate.batch.temperature != group[0].batch.temperature:
                    break
                members = [r.batch for r in group] + [candidate.batch]
                padded_len = max(b.prompt_length for b in members) + max(b.completion_length for b in members)
                if sum(b.batch_size for b in members) * padded_len > self.max_batch_tokens:
                    break
                group.append(self._waiting.popleft())
            return group

    def _run(self) -> None:
        while (group := self._next_group()) is not None:
            batches = [r.batch for r in group]
            start = time.perf_counter()
            try:
                ids, mask, prompt_len = _pad_and_concat(batches)
                logps = self._compute(ids, mask, prompt_len, batches[0].temperature)  # (sum B, C_max)
            except Exception as exc:  # noqa: BLE001 - any model failure goes back to its callers as a 500
                log.exception("reference forward failed for %d request(s)", len(group))
                for r in group:
                    r.future.set_exception(exc)
                continue
            self.busy_seconds += time.perf_counter() - start
            self.forwards += 1
            row = 0
            for r in group:
                b = r.batch
                r.future.set_result(logps[row : row + b.batch_size, : b.completion_length].contiguous())
                row += b.batch_size
                self.tokens += r.tokens
                self.batches += 1


# ---- the HTTP side ----------------------------------------------------------------------------


def create_app(
    scorer: ReferenceScorer,
    config: ServerConfig,
    *,
    model_info: dict,
    queue: RolloutQueue | None = None,
) -> tuple[bottle.Bottle, dict]:
    """The bottle app and its shared state (`state["queue"]`, `state["errors"]`, ...).

    `model_info` is what /health reports: model, vocab_size, device, dtype. The upload worker
    that scores queued batches is started by `start_upload_worker`.
    """
    app = bottle.Bottle()
    queue = queue or RolloutQueue(config.max_queue)
    vocab_size = model_info["vocab_size"]
    started = time.time()
    errors: collections.Counter[str] = collections.Counter()
    state = {"queue": queue, "errors": errors, "scorer": scorer, "upload_failures": 0}

    def reply(status: int, body: dict, headers: dict[str, str] | None = None):
        bottle.response.status = status
        bottle.response.content_type = "application/json"
        for key, value in (headers or {}).items():
            bottle.response.set_header(key, value)
        return json.dumps(body)

    def endpoint(needs_auth: bool = True):
        def wrap(handler):
            def wrapped(*args, **kwargs):
                try:
                    if needs_auth:
                        check_auth()
                    return handler(*args, **kwargs)
                except HTTPFailure as failure:
                    errors[failure.kind] += 1
                    return reply(failure.status, {"error": failure.message}, failure.headers)

            return wrapped

        return wrap

    def check_auth():
        if config.auth_token is None:
            return
        header = bottle.request.get_header("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), config.auth_token.encode()):
            raise HTTPFailure(
                401, "unauthorized", "missing or wrong token: send 'Authorization: Bearer <token>' (REF_SERVER_TOKEN)"
            )

    def read_body() -> bytes:
        length = bottle.request.content_length
        if length < 0:
            raise HTTPFailure(411, "bad_request", "send the batch with a Content-Length header")
        if length > config.max_request_bytes:
            raise HTTPFailure(
                413, "too_large",
                f"request body of {length} bytes is over the limit of {config.max_request_bytes} "
                "(--max_request_mb); send fewer or shorter sequences per request",
            )
        return bottle.request.environ["wsgi.input"].read(length)

    def read_batch(require_rollout: bool) -> Batch:
        try:
            batch = decode_batch(
                read_body(), vocab_size=vocab_size, max_bytes=config.max_request_bytes, require_rollout=require_rollout
            )
        except BatchTooLarge as exc:
            raise HTTPFailure(413, "too_large", str(exc)) from exc
        except WireFormatError as exc:
            raise HTTPFailure(400, "bad_request", str(exc)) from exc
        if batch.seq_len > config.max_batch_tokens:
            raise HTTPFailure(
                413, "too_large",
                f"sequences of {batch.seq_len} tokens do not fit one micro-batch of max_batch_tokens="
                f"{config.max_batch_tokens}; restart the server with a larger --max_batch_tokens",
            )
        return batch

    def score(batch: Batch) -> torch.Tensor:
        try:
            return scorer.score(batch)
        except (RuntimeError, ValueError) as exc:
            raise HTTPFailure(500, "model_error", f"reference model failed: {exc}") from exc

    @app.post("/logps")
    @endpoint()
    def logps():
        batch = read_batch(require_rollout=False)
        batch.ref_logps = score(batch)
        bottle.response.content_type = "application/octet-stream"
        return encode_batch(batch)

    @app.post("/upload")
    @endpoint()
    def upload():
        batch = read_batch(require_rollout=True)
        try:
            batch_id, depth = queue.admit(batch, tokens=batch.batch_size * batch.seq_len)
        except QueueFull as exc:
            raise HTTPFailure(
                503, "queue_full", f"{exc}; retry later", {"Retry-After": str(config.retry_after_seconds)}
            ) from exc
        return reply(202, {"queued": depth, "batch_id": batch_id})

    @app.get("/get")
    @endpoint()
    def get():
        lease_text = bottle.request.query.get("lease")
        lease = config.lease_seconds
        if lease_text is not None:
            try:
                lease = float(lease_text)
            except ValueError as exc:
                raise HTTPFailure(400, "bad_request", f"lease must be a number of seconds, got {lease_text!r}") from exc
            if not 0 < lease <= MAX_LEASE_SECONDS:
                raise HTTPFailure(400, "bad_request", f"lease must be in (0, {MAX_LEASE_SECONDS:g}] seconds")
        entry = queue.take(lease)
        if entry is None:
            bottle.response.status = 204
            return b""
        bottle.response.content_type = "application/octet-stream"
        return entry.payload

    @app.post("/ack/<batch_id>")
    @endpoint()
    def ack(batch_id):
        if not queue.ack(batch_id):
            raise HTTPFailure(
                404, "not_found", f"no delivered batch {batch_id!r} (never issued, or already acknowledged)"
            )
        return reply(200, {"acknowledged": batch_id})

    @app.get("/health")
    @endpoint(needs_auth=False)
    def health():
        return reply(200, {"status": "ok", "format": FORMAT_VERSION, **model_info})

    @app.get("/stats")
    @endpoint()
    def stats():
        busy = scorer.busy_seconds
        return reply(200, {
            "queue": queue.depths(),
            "max_queue": queue.max_queue,
            "delivered": queue.delivered,
            "lease_expirations": queue.lease_expirations,
            "acknowledged": queue.acknowledged,
            "batches_processed": scorer.batches,
            "tokens_processed": scorer.tokens,
            "forward_passes": scorer.forwards,
            "tokens_per_second": scorer.tokens / busy if busy > 0 else 0.0,
            "uptime_seconds": time.time() - started,
            "upload_failures": state["upload_failures"],
            "errors": dict(errors),
        })

    def not_found(error):
        errors["not_found"] += 1
        return reply(404, {"error": f"no endpoint {bottle.request.method} {bottle.request.path}; see GET /health"})

    def method_not_allowed(error):
        errors["bad_request"] += 1
        return reply(405, {"error": f"{bottle.request.method} is not allowed on {bottle.request.path}"})

    def internal_error(error):
        errors["server_error"] += 1
        log.error("unhandled error on %s %s: %s", bottle.request.method, bottle.request.path, error.exception)
        return reply(500, {"error": f"internal server error: {error.exception!r}"})

    app.error(404)(not_found)
    app.error(405)(method_not_allowed)
    app.error(500)(internal_error)
    return app, state


def start_upload_worker(state: dict, stop: threading.Event) -> threading.Thread:
    """Scores uploaded batches in arrival order and makes them deliverable."""
    queue: RolloutQueue = state["queue"]
    scorer: ReferenceScorer = state["scorer"]

    def run():
        while not stop.is_set():
            entry = queue.next_to_score(timeout=0.5)
            if entry is None:
                continue
            batch: Batch = entry.item
            try:
                batch.ref_logps = scorer.score(batch)
                batch.batch_id = entry.batch_id
                queue.scored(entry, encode_batch(batch))
            except Exception:  # noqa: BLE001 - one bad batch must not stop the worker; it is logged and counted
                log.exception("could not score uploaded batch %s; it is dropped", entry.batch_id)
                state["upload_failures"] += 1
                queue.dropped(entry)

    thread = threading.Thread(target=run, name="upload-scorer", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    from waitress import create_server

    from grpo_common.config import config_to_yaml, parse_config
    from grpo_common.modeling import lm_head_plan, load_frozen_model, resolve_device, resolve_dtype

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (config,) = parse_config([ServerConfig], argv)
    shown = dataclasses.replace(config, auth_token="***" if config.auth_token else None)  # never log the secret
    log.info("configuration:\n%s", config_to_yaml(shown))
    if config.host not in ("127.0.0.1", "localhost", "::1") and config.auth_token is None:
        log.warning("listening on %s without --auth_token: anyone who can reach this port can use it", config.host)

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model = load_frozen_model(config.model_name_or_path, device, dtype)
    log.info("LM head: %s", lm_head_plan(model).reason)  # the fused head and its transform, or why not
    model_info = {
        "model": config.model_name_or_path,
        "vocab_size": model.get_output_embeddings().weight.shape[0],
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    scorer = ReferenceScorer(model, config.max_batch_tokens)
    app, state = create_app(scorer, config, model_info=model_info)
    stop = threading.Event()
    upload_worker = start_upload_worker(state, stop)

    server = create_server(
        app, host=config.host, port=config.port, threads=config.threads,
        max_request_body_size=config.max_request_bytes, clear_untrusted_proxy_headers=True,
    )

    def shut_down(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    url = f"http://{config.host}:{server.effective_port}"
    print(f"ref_server ready at {url} model={model_info['model']} device={device} dtype={model_info['dtype']}",
          flush=True)
    try:
        server.run()
    except SystemExit:
        log.info("shutting down")
    finally:
        # In order: no new connections, let requests in flight finish, let the upload worker finish
        # its batch, then stop the model thread. Exiting with those threads still running would
        # let them write to stderr during interpreter shutdown, which aborts the process.
        server.close()
        server.task_dispatcher.shutdown(timeout=10)
        stop.set()
        upload_worker.join(timeout=60)
        scorer.stop()
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
