"""What the trainer (`grpo_ref_split.py`), the generation workers and the reference server (`ref_server.py`) share.

- `config`: typed dataclasses filled from a YAML file plus command-line overrides.
- `wire`: the `grpo-batch/1` batch format (safetensors bytes, validated on arrival; never pickle).
- `client`: the HTTP client for the reference server (timeouts, retries, failover, clear errors).
- `modeling`: loading causal LMs and completion log-probs through `stable_ops`' fused LM head.
- `rollout_queue`: the server's bounded FIFO of uploaded rollouts, with leases.
"""
