"""Training: the DeepSpeed engine (`engine`), one step's update (`update`), checkpoints and policy
snapshots (`checkpoint`), metrics logging (`metrics`), collectives (`distributed`), and stopping on
request (`stopping`)."""
