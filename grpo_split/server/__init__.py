"""The reference server's parts: the model thread that scores requests (`scorer`), the queue of
uploaded rollouts (`queue`), and the HTTP endpoints (`app`); `ref_server.py` is its entry point."""
