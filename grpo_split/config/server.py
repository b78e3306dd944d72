"""The reference server's configuration: one dataclass, filled by `grpo_split.config.parsing.parse_config`.

    python ref_server.py --config configs/ref_server.yaml --port 8000

"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from grpo_split.contract import DEFAULT_PORT, TOKEN_ENV
from grpo_split.contract.batch import MAX_HEADER_BYTES

# The most body bytes a batch can need per token (B x T) under the wire format: int64 ids and mask
# (16), float32 old and ref log-probs and an int64 completion mask over the completion (16), and
# per-row fields (rewards, advantages, scored, a few reward functions) with rows <= tokens / 2 (16).
BYTES_PER_TOKEN = 48

# The longest lease GET /get grants. A trainer step never comes close to a day; the cap turns a unit
# slip (milliseconds sent as seconds) or an infinite lease into a 400 instead of a batch that a dead
# trainer holds, undelivered, for the life of the server.
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
        default=64, metadata={"help": "uploaded batches held at most (awaiting scoring, delivery or the ack of their "
                                      "lease); past it /upload answers 503 + Retry-After"}
    )
    max_request_mb: float = field(default=256.0, metadata={"help": "request bodies above this many MB get 413"})
    max_request_tokens: int = field(
        default=1 << 18,
        metadata={"help": "tokens (rows x sequence length) one /logps or /upload request may carry; more get 413. "
                          "Also caps the body size (BYTES_PER_TOKEN per token), checked from Content-Length before "
                          "the body is read. A trainer's /logps request is one step's batch: prompts_per_step x "
                          "num_generations x (max_prompt_length + max_completion_length) tokens"},
    )
    max_inflight_request_mb: float = field(
        default=128.0,
        metadata={"help": "request bodies read and decoded at once, in MB, at most; a request that would go over "
                          "gets 503 + Retry-After (one request alone is always admitted)"},
    )
    max_connections: int = field(
        default=256,
        metadata={"help": "open connections at most; past it, the connection that has waited longest for its "
                          "request is closed (so slow clients cannot lock others out)"},
    )
    request_timeout_seconds: float = field(
        default=60.0,
        metadata={"help": "a request (line, headers and body) must arrive, and a response be taken, within this "
                          "many seconds, or the connection is closed; also how long an idle connection stays open"},
    )
    auth_token: str | None = field(
        default=None,
        metadata={"help": "bearer token every request but /health must carry (default: env REF_SERVER_TOKEN)"},
    )
    lease_seconds: float = field(
        default=300.0, metadata={"help": "default lease of GET /get: unacknowledged batches are delivered again after"}
    )
    threads: int = field(default=8, metadata={"help": "HTTP worker threads (waitress)"})
    retry_after_seconds: int = field(default=2, metadata={"help": "Retry-After sent with 503 when the queue is full"})
    queue_dir: str | None = field(
        default=None,
        metadata={"help": "directory that keeps the upload queue on disk (SQLite, fsync'd before each 202): a "
                          "restarted server with the same directory delivers every unacknowledged batch; default: "
                          "in memory, lost with the process"},
    )
    max_deliveries: int = field(
        default=3,
        metadata={"help": "a batch delivered this many times without an ack becomes a dead letter (see /stats)"},
    )

    def __post_init__(self):
        if self.auth_token is None:
            self.auth_token = os.environ.get(TOKEN_ENV) or None
        checks = {
            "port": 0 <= self.port <= 65535,
            "max_batch_tokens": self.max_batch_tokens >= 1,
            "max_queue": self.max_queue >= 1,
            "max_request_mb": self.max_request_mb > 0,
            "max_request_tokens": self.max_request_tokens >= 2,
            "max_inflight_request_mb": self.max_inflight_request_mb > 0,
            "max_connections": self.max_connections >= 1,
            "request_timeout_seconds": 0 < self.request_timeout_seconds < float("inf"),
            "lease_seconds": 0 < self.lease_seconds <= MAX_LEASE_SECONDS,
            "threads": self.threads >= 1,
            "retry_after_seconds": self.retry_after_seconds >= 0,
            "max_deliveries": self.max_deliveries >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range; see --help")

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1e6)

    @property
    def max_body_bytes(self) -> int:
        """The body cap: --max_request_mb, or the most a batch of max_request_tokens can take, whichever is less."""
        return min(self.max_request_bytes, self.max_request_tokens * BYTES_PER_TOKEN + MAX_HEADER_BYTES + 8)

    @property
    def max_inflight_request_bytes(self) -> int:
        return int(self.max_inflight_request_mb * 1e6)
