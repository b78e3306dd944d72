"""The generation worker (`loop`): rollouts from the newest policy snapshot, uploaded to the server's queue."""
