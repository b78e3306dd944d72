"""The server's queue of uploaded rollout batches: bounded, FIFO, with leases so nothing is lost.

A batch moves pending (uploaded, waiting for reference log-probs) -> ready (scored) -> leased
(handed to a trainer under a lease id) -> acknowledged, or to dead-lettered with a reason. A lease
that runs out puts the batch back in ready at its original place, so a trainer that dies mid-step
loses nothing: the next `take` delivers it again, oldest first. A batch is never retried forever:
one delivered `max_deliveries` times without an ack, one the scoring worker could not score, and
one a consumer reports unusable (`dead_letter`) are dead letters, counted with their reasons.

Every batch awaiting settlement (pending, ready or leased) counts toward `max_queue`; past it
`admit` refuses, which the server turns into 503 + Retry-After (backpressure instead of unbounded
memory).

An ack or dead letter must name the lease it settles: one whose lease ran out and was given to
another consumer is `StaleLease` (409), so a late consumer cannot settle a batch someone else now
holds. The holder of the batch's last lease may still settle it while nobody else holds it.

With a `SqliteQueueStore` (`ref_server.py --queue_dir`) every change is on disk before the call
returns, and a new queue on the same store continues where the old process stopped: pending
batches are scored again, ready ones delivered in upload order, leases stay valid until their
deadline (so the trainer holding one can still acknowledge it and nothing is trained twice), and
acknowledged or dead-lettered batches never come back. Without a store it all lives in memory.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from grpo_split.contract.batch import decode_batch
from grpo_split.server.store import SqliteQueueStore

# How many settled ids (acknowledged, dead-lettered) and dead-letter reasons are remembered in memory,
# for clear answers to repeated acks and for /stats.
REMEMBERED_SETTLED = 4096
RECENT_DEAD_LETTERS = 10


class QueueFull(Exception):
    """The queue holds `max_queue` batches awaiting settlement; try again later."""


class UnknownBatch(Exception):
    """No batch with that id (never issued, or settled long ago / before a restart without --queue_dir)."""


class StaleLease(Exception):
    """The lease named does not hold the batch (another consumer does, or it was settled)."""


@dataclass(order=True)
class QueuedBatch:
    seq: int  # arrival order: FIFO delivery, and where an expired lease goes back
    batch_id: str = field(compare=False)
    item: Any = field(compare=False)  # the uploaded batch, until scored
    payload: bytes = field(default=b"", compare=False)  # the encoded scored batch, once ready
    tokens: int = field(default=0, compare=False)
    lease: str | None = field(default=None, compare=False)  # the last lease issued for it
    deliveries: int = field(default=0, compare=False)
    scoring_attempts: int = field(default=0, compare=False)


class RolloutQueue:
    def __init__(self, max_queue: int, clock=time.monotonic, *, max_deliveries: int = 3,
                 store: SqliteQueueStore | None = None, wall_clock=time.time):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be >= 1, got {max_deliveries}")
        self.max_queue = max_queue
        self.max_deliveries = max_deliveries
        self.store = store
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Condition()
        self._seq = itertools.count()
        self._pending: collections.deque[QueuedBatch] = collections.deque()
        self._scoring = 0  # taken by the scoring worker, not yet ready
        self._ready: list[QueuedBatch] = []  # heap by seq
        self._leased: dict[str, tuple[float, QueuedBatch]] = {}  # batch_id -> (deadline, entry)
        # batch_id -> ("acked", lease) or ("dead", reason): for clear answers to a repeated settlement.
        self._settled: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()
        self._recent_dead: collections.deque[dict] = collections.deque(maxlen=RECENT_DEAD_LETTERS)
        # upload_id -> batch_id of recent uploads: an upload sent again (its 202 was lost) is not queued twice.
        self._uploads: collections.OrderedDict[str, str] = collections.OrderedDict()
        # Changed only under the lock; `stats` reads them together with the depths.
        self.delivered = 0
        self.lease_expirations = 0
        self.acknowledged = 0
        self.dead_lettered = 0
        self.recovered = 0
        if store is not None:
            self._recover(store)

    @property
    def durable(self) -> bool:
        return self.store is not None

    def _recover(self, store: SqliteQueueStore) -> None:
        """Rebuild the queue from the store (the previous process's state); see the module docstring."""
        last_seq = -1
        now, wall_now = self._clock(), self._wall_clock()
        for row in store.load():
            last_seq = row.seq
            if row.upload_id is not None:
                self._remember_upload(row.upload_id, row.batch_id)
            entry = QueuedBatch(row.seq, row.batch_id, None, lease=row.lease, deliveries=row.deliveries,
                                scoring_attempts=row.scoring_attempts)
            if row.state == "acked":
                self._remember(row.batch_id, ("acked", row.lease or ""))
            elif row.state == "dead":
                self.dead_lettered += 1
                self._remember(row.batch_id, ("dead", row.reason or ""))
                self._recent_dead.append({"batch_id": row.batch_id, "reason": row.reason})
            elif row.state == "pending" and row.scoring_attempts >= self.max_deliveries:
                # Each earlier server died while scoring it: a batch that crashes the server must not crash every
                # restarted one too.
                self._dead_letter(entry, f"scoring was begun {row.scoring_attempts} times and the server stopped "
                                         "during each (did this batch crash it?)")
            elif row.state == "pending":
                entry.item = decode_batch(row.payload)
                entry.tokens = entry.item.batch_size * entry.item.seq_len
                self._pending.append(entry)
                self.recovered += 1
            elif row.state == "ready":
                entry.payload = row.payload
                self._ready.append(entry)
                self.recovered += 1
            elif row.state == "leased":
                entry.payload = row.payload
                self._leased[row.batch_id] = (now + (row.deadline - wall_now), entry)
                self.recovered += 1
        heapq.heapify(self._ready)
        self._seq = itertools.count(last_seq + 1)

    def admit(self, item: Any, tokens: int, payload: bytes | None = None,
              upload_id: str | None = None) -> tuple[str, int, bool]:
        """Queue an uploaded batch for scoring; returns (batch_id, depth, new). Raises QueueFull.

        An `upload_id` seen before (the uploader resent a batch whose answer it never got) admits
        nothing and returns the first upload's batch_id with new=False. A durable queue needs
        `payload`, the batch's bytes, and has them on disk before returning.
        """
        with self._lock:
            self._expire_leases()
            depth = self._awaiting()
            if upload_id is not None and upload_id in self._uploads:
                return self._uploads[upload_id], depth, False
            if depth >= self.max_queue:
                raise QueueFull(f"queue full: {depth} batches awaiting settlement (max_queue={self.max_queue})")
            seq = next(self._seq)
            batch_id = f"{seq:010d}-{uuid.uuid4().hex[:8]}"
            if self.store is not None:
                if payload is None:
                    raise ValueError("a durable queue needs the batch's bytes to admit it")
                self.store.add(seq, batch_id, payload, upload_id)
            if upload_id is not None:
                self._remember_upload(upload_id, batch_id)
            self._pending.append(QueuedBatch(seq, batch_id, item, tokens=tokens))
            self._lock.notify_all()
            return batch_id, depth + 1, True

    def next_to_score(self, timeout: float) -> QueuedBatch | None:
        """The oldest uploaded batch, for the scoring worker; None when none arrives within `timeout`."""
        with self._lock:
            if not self._pending:
                self._lock.wait(timeout)
            if not self._pending:
                return None
            entry = self._pending[0]
            if self.store is not None:
                self.store.scoring(entry.batch_id, entry.scoring_attempts + 1)
            entry.scoring_attempts += 1
            self._scoring += 1
            return self._pending.popleft()

    def scored(self, entry: QueuedBatch, payload: bytes) -> None:
        """The scoring worker finished `entry`: it becomes deliverable."""
        with self._lock:
            if self.store is not None:
                self.store.scored(entry.batch_id, payload)
            self._scoring -= 1
            entry.payload, entry.item = payload, None
            heapq.heappush(self._ready, entry)

    def failed(self, entry: QueuedBatch, reason: str) -> None:
        """The scoring worker could not score `entry`: it becomes a dead letter with `reason`."""
        with self._lock:
            self._scoring -= 1
            entry.item = None
            self._dead_letter(entry, reason)

    def take(self, lease_seconds: float) -> QueuedBatch | None:
        """Lease the oldest ready batch for `lease_seconds` under a new lease id (`entry.lease`);
        None when nothing is ready."""
        with self._lock:
            self._expire_leases()
            if not self._ready:
                return None
            entry, lease = self._ready[0], uuid.uuid4().hex
            if self.store is not None:  # on disk first: if that fails, the batch stays ready
                self.store.leased(entry.batch_id, lease, self._wall_clock() + lease_seconds, entry.deliveries + 1)
            heapq.heappop(self._ready)
            entry.lease, entry.deliveries = lease, entry.deliveries + 1
            self._leased[entry.batch_id] = (self._clock() + lease_seconds, entry)
            self.delivered += 1
            return entry

    def ready_count(self) -> int:
        """Batches a `take` would deliver now (for HEAD /get, which must not lease)."""
        with self._lock:
            self._expire_leases()
            return len(self._ready)

    def ack(self, batch_id: str, lease: str) -> bool:
        """Settle a delivered batch as consumed. True when `lease` settled it now, False when it had
        already acknowledged it (a repeated ack). Raises StaleLease or UnknownBatch."""
        with self._lock:
            settled = self._settled.get(batch_id)
            if settled == ("acked", lease):
                return False
            entry = self._held_by(batch_id, lease)
            if self.store is not None:
                self.store.acked(batch_id)
            self._remove(entry)
            self._remember(batch_id, ("acked", lease))
            self.acknowledged += 1
            return True

    def dead_letter(self, batch_id: str, lease: str, reason: str) -> None:
        """A consumer cannot use the batch it holds under `lease`: settle it as a dead letter.
        Raises StaleLease or UnknownBatch."""
        with self._lock:
            entry = self._held_by(batch_id, lease)
            self._dead_letter(entry, reason)  # on disk first: if that fails, the batch stays where it was
            self._remove(entry)

    def _held_by(self, batch_id: str, lease: str) -> QueuedBatch:
        """The batch that `lease` holds (leased now, or its lease ran out and nobody else took it
        since); StaleLease or UnknownBatch otherwise. Changes nothing: `_remove` takes it out once
        the store has recorded its settlement."""
        self._expire_leases()
        if batch_id in self._leased:
            entry = self._leased[batch_id][1]
            if entry.lease != lease:
                raise StaleLease(f"batch {batch_id} is held by another lease now (yours ran out and it was delivered "
                                 "again); nothing was changed")
            return entry
        for entry in self._ready:
            if entry.batch_id == batch_id:
                if entry.lease is None or entry.lease != lease:
                    raise StaleLease(f"batch {batch_id} is not held by lease {lease!r}; nothing was changed")
                return entry
        settled = self._settled.get(batch_id)
        if settled is not None:
            state, detail = settled
            what = "acknowledged" if state == "acked" else f"dead-lettered ({detail})"
            raise StaleLease(f"batch {batch_id} was already {what}; nothing was changed")
        if any(entry.batch_id == batch_id for entry in self._pending):
            raise StaleLease(f"batch {batch_id} has not been delivered yet; nothing was changed")
        raise UnknownBatch(f"no batch {batch_id!r} awaiting settlement (never issued, or settled long ago)")

    def _remove(self, entry: QueuedBatch) -> None:
        """Take a settled batch out of leased or ready."""
        if self._leased.pop(entry.batch_id, None) is None:
            self._ready.remove(entry)
            heapq.heapify(self._ready)

    def _dead_letter(self, entry: QueuedBatch, reason: str) -> None:
        if self.store is not None:
            self.store.dead(entry.batch_id, reason)
        self.dead_lettered += 1
        self._remember(entry.batch_id, ("dead", reason))
        self._recent_dead.append({"batch_id": entry.batch_id, "reason": reason})
        self.on_dead_letter(entry.batch_id, reason)

    def on_dead_letter(self, batch_id: str, reason: str) -> None:
        """Called under the lock for every new dead letter; the server logs it."""

    def _remember(self, batch_id: str, outcome: tuple[str, str]) -> None:
        self._settled[batch_id] = outcome
        while len(self._settled) > REMEMBERED_SETTLED:
            self._settled.popitem(last=False)

    def _remember_upload(self, upload_id: str, batch_id: str) -> None:
        self._uploads[upload_id] = batch_id
        while len(self._uploads) > REMEMBERED_SETTLED:
            self._uploads.popitem(last=False)

    def _expire_leases(self) -> None:
        now = self._clock()
        for batch_id, (deadline, entry) in list(self._leased.items()):
            if deadline <= now:
                del self._leased[batch_id]
                self.lease_expirations += 1
                if entry.deliveries >= self.max_deliveries:
                    self._dead_letter(entry, f"delivered {entry.deliveries} times without acknowledgement")
                    continue
                if self.store is not None:
                    self.store.expired(batch_id)
                heapq.heappush(self._ready, entry)

    def _awaiting(self) -> int:
        return len(self._pending) + self._scoring + len(self._ready) + len(self._leased)

    def depths(self) -> dict[str, int]:
        with self._lock:
            return self._depths()

    def stats(self) -> dict:
        """Depths and delivery counters for /stats, read under one lock so they describe the same moment."""
        with self._lock:
            return {
                "queue": self._depths(),
                "max_queue": self.max_queue,
                "max_deliveries": self.max_deliveries,
                "durable": self.store is not None,
                "delivered": self.delivered,
                "lease_expirations": self.lease_expirations,
                "acknowledged": self.acknowledged,
                "dead_lettered": self.dead_lettered,
                "recent_dead_letters": list(self._recent_dead),
            }

    def _depths(self) -> dict[str, int]:
        self._expire_leases()
        return {
            "pending": len(self._pending) + self._scoring,
            "ready": len(self._ready),
            "leased": len(self._leased),
        }
