"""Where `RolloutQueue` keeps its batches when the server runs with `--queue_dir`: one SQLite database.

Why SQLite in WAL mode, and not one file per batch: every change of a batch's state (uploaded ->
scored -> leased -> acknowledged or dead-lettered) is one UPDATE of one row, atomic and durable on
its own, where files would need a write-fsync-rename-fsync dance per state and a recovery pass to
settle half-finished renames. `sqlite3` is in the standard library; with `journal_mode=WAL` and
`synchronous=FULL` a commit returns only once the write-ahead log is fsync'd (SQLite fsyncs the
directory when it creates the log), so a batch the server answered 202 for survives `kill -9` and
power loss. The batch bytes are BLOBs (the upload body is capped far below SQLite's 1 GB BLOB limit).

The cost: the queue's lock is held while a commit fsyncs, so a large upload (hundreds of MB) delays
a concurrent GET /get or ack by the time its write takes. Uploads come one per training step, so
this is rare and short next to a step.

Rows: `seq` (upload order), `batch_id`, `state` (pending | ready | leased | acked | dead), the batch
bytes (the upload while pending, the scored batch once ready; kept for dead letters so an operator
can look at them; dropped once acknowledged), `deliveries`, the current `lease` id and its
wall-clock `deadline` (leases survive a restart: the trainer that holds one can still acknowledge
it), the dead letter's `reason`, and the uploader's `upload_id` (a resent upload is recognised).
Acknowledged rows keep only their ids and lease, so that an ack or upload repeated after a restart
is recognised; the newest `KEEP_ACKED` of them are kept.

One server per directory: an exclusive `flock` on `DIR/lock`, released by the kernel when the
process dies however it dies.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

KEEP_ACKED = 4096
# A big upload grows the write-ahead log; after each checkpoint SQLite truncates it to this size.
JOURNAL_SIZE_LIMIT = 64 << 20


class QueueDirBusy(RuntimeError):
    """Another process holds the queue directory's lock."""


@dataclass
class StoredBatch:
    seq: int
    batch_id: str
    state: str
    payload: bytes | None
    deliveries: int
    lease: str | None
    deadline: float | None  # wall-clock seconds (time.time())
    reason: str | None
    upload_id: str | None  # the uploader's id of the upload, so a resent upload is recognised
    scoring_attempts: int  # scorings begun: a batch whose scoring kills the server is not retried forever


class SqliteQueueStore:
    """The durable side of the queue. Not thread-safe on its own: `RolloutQueue` calls it under its lock."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.directory / "lock", "a")  # noqa: SIM115 - held for the life of the store
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock_file.close()
            raise QueueDirBusy(
                f"queue directory {self.directory} is in use by another ref_server; give each server its own "
                "--queue_dir"
            ) from exc
        # isolation_level=None: every statement commits on its own (each is one atomic state change).
        self._db = sqlite3.connect(self.directory / "queue.sqlite3", isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # fsync the log at every commit: durable before the 202
        self._db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS batches (seq INTEGER PRIMARY KEY, batch_id TEXT UNIQUE NOT NULL, "
            "state TEXT NOT NULL, payload BLOB, deliveries INTEGER NOT NULL DEFAULT 0, lease TEXT, deadline REAL, "
            "reason TEXT, upload_id TEXT, scoring_attempts INTEGER NOT NULL DEFAULT 0)"
        )
        self._db.execute(
            "DELETE FROM batches WHERE state = 'acked' AND seq NOT IN "
            "(SELECT seq FROM batches WHERE state = 'acked' ORDER BY seq DESC LIMIT ?)", (KEEP_ACKED,)
        )

    def load(self) -> list[StoredBatch]:
        """Every row, in upload order."""
        rows = self._db.execute(
            "SELECT seq, batch_id, state, payload, deliveries, lease, deadline, reason, upload_id, scoring_attempts "
            "FROM batches ORDER BY seq"
        )
        return [StoredBatch(*row) for row in rows]

    def add(self, seq: int, batch_id: str, payload: bytes, upload_id: str | None = None) -> None:
        self._db.execute("INSERT INTO batches (seq, batch_id, state, payload, upload_id) "
                         "VALUES (?, ?, 'pending', ?, ?)", (seq, batch_id, payload, upload_id))

    def scoring(self, batch_id: str, attempts: int) -> None:
        self._db.execute("UPDATE batches SET scoring_attempts = ? WHERE batch_id = ?", (attempts, batch_id))

    def scored(self, batch_id: str, payload: bytes) -> None:
        self._db.execute("UPDATE batches SET state = 'ready', payload = ? WHERE batch_id = ?", (payload, batch_id))

    def leased(self, batch_id: str, lease: str, deadline: float, deliveries: int) -> None:
        self._db.execute("UPDATE batches SET state = 'leased', lease = ?, deadline = ?, deliveries = ? "
                         "WHERE batch_id = ?", (lease, deadline, deliveries, batch_id))

    def expired(self, batch_id: str) -> None:
        """The lease ran out; the lease id is kept so that its holder's late ack can still settle the batch."""
        self._db.execute("UPDATE batches SET state = 'ready', deadline = NULL WHERE batch_id = ?", (batch_id,))

    def acked(self, batch_id: str) -> None:
        self._db.execute("UPDATE batches SET state = 'acked', payload = NULL, deadline = NULL WHERE batch_id = ?",
                         (batch_id,))

    def dead(self, batch_id: str, reason: str) -> None:
        self._db.execute("UPDATE batches SET state = 'dead', deadline = NULL, reason = ? WHERE batch_id = ?",
                         (reason, batch_id))

    def close(self) -> None:
        self._db.close()
        self._lock_file.close()
