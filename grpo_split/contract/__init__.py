"""The contract between processes: the wire format of a rollout batch (`batch`) and the HTTP client
every process uses to reach the reference server (`client`); and where a server is found by
default, which both sides must agree on."""

# The one place the default port is set: the server binds it, clients and the trainer's
# `ref_server_url` default point at it.
DEFAULT_PORT = 59875
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
# The environment variable that holds the server's bearer token, for the server and its clients alike.
TOKEN_ENV = "REF_SERVER_TOKEN"
