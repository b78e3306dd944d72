"""What the trainer (`grpo_ref_split.py`) and the reference server (`ref_server.py`) share.

- `config`: typed dataclasses filled from a YAML file plus command-line overrides.
"""
