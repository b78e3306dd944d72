"""One step equals one whole batch (scripts/check_update_invariance.py): the trainer's update against
the float64 update of the same rollouts as one batch in one process.

The fast cases run in this process as a world of one (DeepSpeed on the CPU, gloo); one case runs
two real ranks under the `deepspeed` launcher, with ZeRO-3 and gradient accumulation, plus the
rest of the representative subset. `python scripts/check_update_invariance.py` runs the covering
set of the whole matrix.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import load_script

invariance = load_script("check_update_invariance")
Case = invariance.Case
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# In-process, one rank. Together they fail under each mutation of the step's glue that the suite
# must see: old log-probs ignored (ratio 1: the worker-fed cases), the first micro-batch's
# advantages reused (GA > 1), the accumulation loss left unscaled (GA > 1 with SGD, where the
# update is the gradient itself), log-probs at temperature 1 (the batch's is 0.7), and the
# trainer's own old log-probs when num_iterations > 1.
FAST_CASES = [
    Case(2, False, 2, 1, "grpo", "token", 0.1, 1, "server"),
    Case(2, True, 2, 1, "bnpo", "token", 0.0, 2, "local"),
    Case(2, False, 4, 1, "dapo", "sequence", 0.1, 1, "server"),
    Case(3, False, 2, 1, "dr_grpo", "token", 0.1, 2, "server"),
]


@pytest.fixture(scope="module")
def step_inputs(tmp_path_factory):
    model_dir = invariance.build_model(tmp_path_factory.mktemp("invariance") / "model")
    return model_dir, invariance.make_step_batch(model_dir)


@pytest.fixture
def world_of_one():
    from grpo_split.training import distributed as dist_utils

    saved = {key: os.environ.pop(key) for key in DIST_ENV if key in os.environ}
    dist_utils.init_distributed()
    yield
    for key in DIST_ENV:
        os.environ.pop(key, None)
    os.environ.update(saved)


@pytest.mark.parametrize("case", FAST_CASES, ids=lambda case: case.name)
def test_one_step_equals_the_whole_batch_update(case, step_inputs, world_of_one):
    model_dir, whole = step_inputs
    ours = invariance.trainer_update(case, model_dir, whole, rank=0, world_size=1)
    error = invariance.compare(case, model_dir, ours, invariance.reference_update(case, model_dir, whole))
    assert error <= invariance.TOLERANCE, f"{case.name}: relative error {error:.2e}"


def test_the_check_sees_a_wrong_update(step_inputs, world_of_one):
    """The comparison is sharp: a different loss normalization of the same rollouts is far off."""
    model_dir, whole = step_inputs
    case = Case(2, False, 1, 1, "grpo", "token", 0.0, 1, "local")
    ours = invariance.trainer_update(case, model_dir, whole, rank=0, world_size=1)
    other = invariance.reference_update(Case(2, False, 1, 1, "dapo", "token", 0.0, 1, "local"), model_dir, whole)
    assert invariance.compare(case, model_dir, ours, other) > 1e-2


def test_pairwise_cases_cover_every_pair_of_settings():
    import itertools

    cases = invariance.pairwise_cases()
    for (a, values_a), (b, values_b) in itertools.combinations(invariance.FACTORS.items(), 2):
        seen = {(getattr(c, a), getattr(c, b)) for c in cases}
        assert seen == set(itertools.product(values_a, values_b)), (a, b)
    assert len(cases) < 20  # far fewer than the 1,536 combinations


@pytest.mark.e2e
def test_two_ranks_with_zero3_and_gradient_accumulation_equal_the_whole_batch(tmp_path):
    """The representative subset on two real ranks (one `deepspeed --num_gpus 2` launch): ZeRO-3 with
    GA 2 and 4, worker-fed batches split over the ranks, every loss type."""
    results = invariance.check_cases(list(invariance.CI_SUBSET), tmp_path, timeout=600)
    failures = [(case.name, error) for case, error in results if error > invariance.TOLERANCE]
    assert not failures, failures
    assert {case.ranks for case, _ in results} == {2}
    assert any(case.zero == 3 and case.ga == 2 for case, _ in results)


def test_a_worker_batch_is_split_into_whole_groups_per_rank():
    from grpo_split.contract.batch import Batch
    from grpo_split.rollouts.sources import rank_share

    rows = 16
    batch = Batch(input_ids=torch.arange(rows * 3).view(rows, 3), prompt_length=1,
                  advantages=torch.arange(rows, dtype=torch.float32), completion_mask=torch.ones(rows, 2),
                  num_generations=4, policy_version=0)
    shares = [rank_share(batch, rank, 2) for rank in range(2)]
    assert [s.batch_size for s in shares] == [8, 8]
    assert torch.equal(torch.cat([s.advantages for s in shares]), batch.advantages)
    assert torch.equal(shares[1].input_ids, batch.input_ids[8:])
    assert shares[0].num_generations == 4 and shares[0].prompt_length == 1


def test_a_worker_batch_that_is_not_one_step_is_refused_naming_the_contract(step_inputs, world_of_one):
    from grpo_split.contract.batch import encode_batch
    from grpo_split.rollouts.sources import ServerRollouts, rank_share

    model_dir, whole = step_inputs
    config = invariance.run_config(Case(2, False, 1, 1, "grpo", "token", 0.0, 1, "server"), model_dir)
    half = rank_share(whole, 0, 2)  # 8 rows where the step has 16
    config.server.rollout_wait = 0.01
    queue = invariance._QueueOfOne(encode_batch(half))
    source = ServerRollouts(config, queue, rank=0, world_size=1, eos_ids=[0])
    # Dead-lettered, not raised (a raise left it leased, to crash the restarted trainer again); the
    # queue then holds nothing, so this trainer times out waiting for a batch it can use.
    with pytest.raises(TimeoutError, match="no rollout batch arrived"):
        source.next_batch(policy_version=0)
    [reason] = queue.dead_letters
    assert "One uploaded batch is one training step" in reason and source.metrics()["dead_lettered_batches"] == 1
