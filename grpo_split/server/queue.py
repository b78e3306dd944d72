"""The server's queue of uploaded rollout batches: bounded, FIFO, with leases so nothing is lost.

A batch moves pending (uploaded, waiting for reference log-probs) -> ready (scored) -> leased
(handed to a trainer) -> gone (acknowledged). A lease that runs out puts the batch back in ready
at its original place, so a trainer that dies mid-step loses nothing: the next `take` delivers
it again, oldest first. Pending plus ready is bounded by `max_queue`; past it `admit` refuses,
which the server turns into 503 + Retry-After (backpressure instead of unbounded memory).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue holds `max_queue` batches awaiting delivery; try again later."""


@dataclass(order=True)
class QueuedBatch:
    seq: int  # arrival order: FIFO delivery, and where an expired lease goes back
    batch_id: str = field(compare=False)
    item: Any = field(compare=False)  # the uploaded batch, until scored
    payload: bytes = field(default=b"", compare=False)  # the encoded scored batch, once ready
    tokens: int = field(default=0, compare=False)


class RolloutQueue:
    def __init__(self, max_queue: int, clock=time.monotonic):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_queue = max_queue
        self._clock = clock
        self._lock = threading.Condition()
        self._seq = itertools.count()
        self._pending: deque[QueuedBatch] = deque()
        self._scoring = 0  # taken by the scoring worker, not yet ready
        self._ready: list[QueuedBatch] = []  # heap by seq
        self._leased: dict[str, tuple[float, QueuedBatch]] = {}  # batch_id -> (deadline, entry)
        # Changed only under the lock; `stats` reads them together with the depths.
        self.delivered = 0
        self.lease_expirations = 0
        self.acknowledged = 0

    def admit(self, item: Any, tokens: int) -> tuple[str, int]:
        """Queue an uploaded batch for scoring; returns (batch_id, depth). Raises QueueFull."""
        with self._lock:
            depth = len(self._pending) + self._scoring + len(self._ready)
            if depth >= self.max_queue:
                raise QueueFull(f"queue full: {depth} batches waiting (max_queue={self.max_queue})")
            seq = next(self._seq)
            batch_id = f"{seq:010d}-{uuid.uuid4().hex[:8]}"
            self._pending.append(QueuedBatch(seq, batch_id, item, tokens=tokens))
            self._lock.notify_all()
            return batch_id, depth + 1

    def next_to_score(self, timeout: float) -> QueuedBatch | None:
        """The oldest uploaded batch, for the scoring worker; None when none arrives within `timeout`."""
        with self._lock:
            if not self._pending:
                self._lock.wait(timeout)
            if not self._pending:
                return None
            self._scoring += 1
            return self._pending.popleft()

    def scored(self, entry: QueuedBatch, payload: bytes) -> None:
        """The scoring worker finished `entry`: it becomes deliverable."""
        with self._lock:
            self._scoring -= 1
            entry.payload, entry.item = payload, None
            heapq.heappush(self._ready, entry)

    def dropped(self, entry: QueuedBatch) -> None:
        """The scoring worker could not score `entry` (model failure): it leaves the queue."""
        with self._lock:
            self._scoring -= 1

    def take(self, lease_seconds: float) -> QueuedBatch | None:
        """Lease the oldest ready batch for `lease_seconds`; None when nothing is ready."""
        with self._lock:
            self._expire_leases()
            if not self._ready:
                return None
            entry = heapq.heappop(self._ready)
            self._leased[entry.batch_id] = (self._clock() + lease_seconds, entry)
            self.delivered += 1
            return entry

    def ack(self, batch_id: str) -> bool:
        """Forget a delivered batch; False when the id is unknown (never issued, or already acknowledged)."""
        with self._lock:
            if self._leased.pop(batch_id, None) is not None:
                self.acknowledged += 1
                return True
            # A lease that expired put the batch back; a late ack from its trainer still settles it.
            for i, entry in enumerate(self._ready):
                if entry.batch_id == batch_id:
                    self._ready[i] = self._ready[-1]
                    self._ready.pop()
                    heapq.heapify(self._ready)
                    self.acknowledged += 1
                    return True
            return False

    def _expire_leases(self) -> None:
        now = self._clock()
        for batch_id, (deadline, entry) in list(self._leased.items()):
            if deadline <= now:
                del self._leased[batch_id]
                heapq.heappush(self._ready, entry)
                self.lease_expirations += 1

    def depths(self) -> dict[str, int]:
        with self._lock:
            return self._depths()

    def stats(self) -> dict:
        """Depths and delivery counters for /stats, read under one lock so they describe the same moment."""
        with self._lock:
            return {
                "queue": self._depths(),
                "max_queue": self.max_queue,
                "delivered": self.delivered,
                "lease_expirations": self.lease_expirations,
                "acknowledged": self.acknowledged,
            }

    def _depths(self) -> dict[str, int]:
        self._expire_leases()
        return {
            "pending": len(self._pending) + self._scoring,
            "ready": len(self._ready),
            "leased": len(self._leased),
        }
