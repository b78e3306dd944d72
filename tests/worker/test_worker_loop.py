"""The generation worker's loop (grpo_split.worker.loop) around a server that restarts."""

from __future__ import annotations

from grpo_split.worker.loop import upload_across_restarts


class RestartingServer:
    """Refuses connections for the first upload, then is back (as after a restart with --queue_dir)."""

    def __init__(self):
        self.uploads: list[object] = []
        self.ready_waits: list[float] = []
        self.down = True

    def upload(self, batch, max_wait: float, upload_id: str) -> dict:
        if self.down:
            raise ConnectionError("no reference server at http://127.0.0.1:1")
        self.uploads.append(batch)
        return {"queued": 1, "batch_id": "0000000001-abcd"}

    def wait_ready(self, timeout: float) -> dict:
        self.ready_waits.append(timeout)
        self.down = False
        return {"status": "ok"}


def test_an_upload_that_meets_a_restarting_server_waits_for_it_and_is_sent_again(capsys):
    """Before: the ConnectionError ended the worker, although the restarted server would have taken the batch."""
    server = RestartingServer()
    answer = upload_across_restarts(server, "batch", max_wait=5.0, ready_wait=30.0)
    assert answer["batch_id"] == "0000000001-abcd" and server.uploads == ["batch"] and server.ready_waits == [30.0]
    assert "waiting up to 30 s" in capsys.readouterr().err
