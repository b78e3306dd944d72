"""grpo-ref-split: GRPO training with the reference model in its own HTTP server.

The subpackages are the roles of the running system:
- `config`: the typed configuration of each process (dataclasses parsed from YAML plus command-line
  overrides).
- `contract`: what crosses between processes: the `grpo-batch/1` wire format (`batch`) and the
  HTTP client of the reference server (`client`).
- `rollouts`: sampling, rewards, prompt data, and the `RolloutSource`s a training step draws from.
- `training`: the DeepSpeed engine, the update step, checkpoints, metrics, distributed helpers.
- `server`: the reference server's scoring thread, upload queue and HTTP handlers.
- `worker`: the generation worker's loop.
`modeling` loads models and computes completion log-probs for every process alike; the numerics
themselves live in the top-level `stable_ops` package. The entry points are the top-level scripts
`grpo_ref_split.py` (trainer and worker) and `ref_server.py`.
"""
