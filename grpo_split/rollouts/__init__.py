"""Rollouts: prompts (`data`), sampling (`sampling`), reward functions (`rewards`), the wire batch and
its metrics (`build`, `metrics`), and the rollout sources a training step draws from (`sources`)."""
