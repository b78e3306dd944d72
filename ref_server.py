"""Reference-model server: the frozen initial policy behind HTTP, so it needs no room on the training GPUs.

    python ref_server.py --model_name_or_path Qwen/Qwen2.5-7B-Instruct --device cuda:0
    python ref_server.py --config configs/ref_server.yaml --port 8000
    REF_SERVER_TOKEN=secret python ref_server.py --model_name_or_path PATH --host 0.0.0.0

Endpoints (batches are `grpo_split.contract.batch` bytes; everything else is JSON):
    POST /logps          a batch -> the same batch with `ref_logps` (B, T-P); concurrent requests are coalesced
    POST /upload?upload_id=U  a generation worker's scored rollout batch (every field a trainer needs, else 400)
                         -> 202 {queued, batch_id}; the same U again -> the first batch_id, "duplicate": true;
                         503 + Retry-After when full (leased batches count)
    GET  /get?lease=S    the oldest batch with reference log-probs and a `batch_id`, leased under the id in its
                         X-Lease-Id header; 204 when none is ready (HEAD /get: 200 or 204, leases nothing)
    POST /ack/<id>?lease=L  settle a delivered batch; unacknowledged batches are delivered again after their lease,
                         at most --max_deliveries times, then dead-lettered; 409 when lease L no longer holds it
    POST /dead/<id>      {"lease": L, "reason": "..."}: a consumer settles a batch it cannot use as a dead letter
    GET  /health         status, model, vocab size, device, dtype, wire format, max_request_tokens (never needs
                         the token)
    GET  /stats          queue depths, batches and tokens processed, tokens/s, errors by kind, dead letters (count
                         and the last reasons)
Errors are JSON `{"error": "..."}` with 400 (bad input), 401, 404, 409 (stale lease), 411, 413, 503 (+ Retry-After)
or 500. With --queue_dir every accepted upload is on disk before its 202 (grpo_split/server/store.py).
Limits (grpo_split/server/http.py): 413 over --max_request_tokens (refused from Content-Length before the body is
read), 503 + Retry-After past --max_inflight_request_mb, 431 for headers over 256 kB; a connection whose request
does not arrive within --request_timeout_seconds is closed, as is the longest-waiting one past --max_connections.
Without a token: 415 for browser-simple content types, 421 for a Host that is not an IP, localhost or --host.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading

import torch

from grpo_split.config.parsing import config_to_yaml, parse_config
from grpo_split.config.server import ServerConfig
from grpo_split.modeling import lm_head_plan, load_frozen_model, resolve_device, resolve_dtype
from grpo_split.server.app import ReferenceServerApp
from grpo_split.server.http import create_http_server
from grpo_split.server.queue import RolloutQueue
from grpo_split.server.scorer import STOP_JOIN_SECONDS, ReferenceScorer
from grpo_split.server.store import SqliteQueueStore

log = logging.getLogger("ref_server")

# Shutdown waits, in the order they are spent. Requests still in flight once the listener is closed
# get this long to finish (a /logps request waits for its forward); waitress, which handles the
# SystemExit of SIGTERM itself, has already waited up to its own default of 5 s by then.
HTTP_DRAIN_SECONDS = 10
# The upload worker may be queued at the scorer behind requests still in flight and then runs its
# own forward: twice what `ReferenceScorer.stop` allows the one forward in progress.
UPLOAD_WORKER_JOIN_SECONDS = 2 * STOP_JOIN_SECONDS


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (config,) = parse_config([ServerConfig], argv)
    shown = dataclasses.replace(config, auth_token="***" if config.auth_token else None)  # never log the secret
    log.info("configuration:\n%s", config_to_yaml(shown))
    if config.host not in ("127.0.0.1", "localhost", "::1") and config.auth_token is None:
        log.warning("listening on %s without --auth_token: anyone who can reach this port can use it", config.host)

    model, model_info = load_model(config)
    scorer = ReferenceScorer(model, config.max_batch_tokens)
    server_app = ReferenceServerApp(scorer, config, model_info, queue=make_queue(config))
    stop = threading.Event()
    upload_worker = server_app.start_upload_worker(stop)
    server = create_http_server(server_app, config)

    def shut_down(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    url = f"http://{config.host}:{server.effective_port}"
    print(f"ref_server ready at {url} model={model_info['model']} device={model_info['device']} "
          f"dtype={model_info['dtype']}", flush=True)
    try:
        server.run()
    except SystemExit:
        log.info("shutting down")
    finally:
        # In order: no new connections, let requests in flight finish, let the upload worker finish
        # its batch, then stop the model thread. Exiting with those threads still running would
        # let them write to stderr during interpreter shutdown, which aborts the process.
        server.close()
        server.task_dispatcher.shutdown(timeout=HTTP_DRAIN_SECONDS)
        stop.set()
        upload_worker.join(timeout=UPLOAD_WORKER_JOIN_SECONDS)
        scorer.stop()
        log.info("stopped")
    return 0


def make_queue(config: ServerConfig) -> RolloutQueue:
    """The upload queue: on disk under --queue_dir (continuing what a previous server left there), else in memory."""
    if config.queue_dir is None:
        log.info("upload queue in memory: queued and leased batches are lost if the server stops (--queue_dir keeps "
                 "them on disk)")
        return RolloutQueue(config.max_queue, max_deliveries=config.max_deliveries)
    queue = RolloutQueue(config.max_queue, max_deliveries=config.max_deliveries,
                         store=SqliteQueueStore(config.queue_dir))
    log.info("upload queue on disk in %s: %d unsettled batches recovered (%s), %d dead letters", config.queue_dir,
             queue.recovered, queue.depths(), queue.dead_lettered)
    return queue


def load_model(config: ServerConfig) -> tuple[torch.nn.Module, dict]:
    """The frozen reference model, and what /health reports about it."""
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
    return model, model_info


if __name__ == "__main__":
    sys.exit(main())
