"""Fault tolerance on a real local Ray cluster: actors and learner workers are
killed during a tiny PPO run, and the run still ends with every iteration
trained exactly once."""

import os
import signal

import pytest
import torch

from hh_ray.orchestration.controller import RLHFController
from hh_ray.rollout import RolloutBatch, drop_nonfinite
from hh_ray.tracking import read_metrics
from tests.conftest import tiny_config

ITERATIONS = 5
BATCH = 16


def run_injected(controller, inject) -> dict:
    """The controller's run with `inject(phase, iteration)` called as each phase starts."""
    controller.on_phase = inject
    try:
        return controller.run()
    finally:
        controller.shutdown()


def test_nonfinite_rollouts_are_dropped_and_counted():
    batch = RolloutBatch.from_samples([[1, 2], [3], [4, 5]], [[6, 7], [8], [9]],
                                      [[-0.1, -0.2], [float("nan")], [-0.3]], [0, 0, 0],
                                      ["a", "b", "c"], ["x", "y", "z"], ["stop"] * 3, pad_id=0)
    batch.pm_score = torch.tensor([0.5, 0.1, float("inf")])
    kept, dropped = drop_nonfinite(batch)
    assert dropped == 2 and kept.prompts == ["a"]
    assert torch.equal(kept.input_ids[0, :4], torch.tensor([1, 2, 6, 7]))
    same, none = drop_nonfinite(kept)
    assert none == 0 and same is kept


@pytest.fixture(scope="module")
def faulty_run(ray_cluster, tiny_pm, tmp_path_factory):
    """Kill, during one run: a generation worker (SIGKILL) as iteration 1 starts
    generating, the PM service (ray.kill) as iteration 2 starts scoring, and a
    learner worker (SIGKILL) as iteration 3 starts learning (last checkpoint: iteration 2)."""
    import ray

    run_dir = tmp_path_factory.mktemp("ppo-faults")
    cfg = tiny_config(**{"model.pm": tiny_pm, "ppo.iterations": ITERATIONS, "ppo.rollout_batch_size": BATCH,
                         "generation.num_workers": 2, "ppo.num_learners": 2, "ppo.checkpoint_every": 2})
    controller = RLHFController(cfg, run_dir)
    killed = []

    def inject(phase, i):
        if (phase, i) == ("generate", 1) and "generation" not in killed:
            pid = ray.get(controller.rollouts.pool.workers[0].info.remote())["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append("generation")
        elif (phase, i) == ("score", 2) and "pm" not in killed:
            ray.kill(controller.rollouts.scorer)
            killed.append("pm")
        elif (phase, i) == ("learn", 3) and "learner" not in killed:
            os.kill(controller.learners.pids[1], signal.SIGKILL)
            killed.append("learner")

    return run_dir, run_injected(controller, inject), killed


def test_run_survives_killed_generator_pm_and_learner(faulty_run):
    run_dir, result, killed = faulty_run
    assert killed == ["generation", "pm", "learner"]
    assert (result["restarts_generation"], result["restarts_pm"], result["restarts_learner"]) == (1, 1, 1)

    rows = read_metrics(run_dir, "ppo")
    # Iteration 3 (step 4) died in learning and rolled back to the step-2
    # checkpoint: step 3 was trained twice, everything else once.
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 5]
    faults = read_metrics(run_dir, "ppo_fault")
    assert [(f["step"], f["what"]) for f in faults] == [(2, "learner_restart")]
    assert faults[0]["checkpoint"].endswith("step-000002")

    final = read_metrics(run_dir, "ppo", last_per_step=True)
    assert [r["step"] for r in final] == list(range(1, ITERATIONS + 1))
    # No rollout lost: every trained batch is whole, none dropped.
    assert all(r["samples"] == BATCH and r["dropped_nonfinite"] == 0 for r in final)
    # The metrics say what happened, in the iteration it happened.
    assert [r["restarts_generation"] for r in rows] == [0, 1, 0, 0, 0, 0]
    assert [r["restarts_pm"] for r in rows] == [0, 0, 1, 0, 0, 0]
    assert [r["restarts_learner_total"] for r in rows] == [0, 0, 0, 1, 1, 1]
    # None duplicated or replaced by other data: the redone iteration drew the
    # same prompts and samples (same seeds, same checkpointed weights).
    first, redo = rows[2], rows[3]
    assert redo["tokens_generated"] == first["tokens_generated"]
    assert redo["reward_pm"] == pytest.approx(first["reward_pm"], abs=1e-5)
    assert (run_dir / "policy" / "config.json").exists()


@pytest.fixture(scope="module")
def learner_killed_outside_learn(ray_cluster, tiny_pm, tmp_path_factory):
    """Kill a learner worker (SIGKILL) as iteration 2 starts its weight sync, and, once
    that restart is rolled back, again as the redone iteration 2 starts generating.
    Neither is a moment the learners are busy: each restart is found at the next
    learner command. Last checkpoint before both: iteration 2."""
    run_dir = tmp_path_factory.mktemp("ppo-learner-faults")
    cfg = tiny_config(**{"model.pm": tiny_pm, "ppo.iterations": 4, "ppo.rollout_batch_size": BATCH,
                         "generation.num_workers": 1, "ppo.num_learners": 2, "ppo.checkpoint_every": 2,
                         "ppo.eval_prompts": 0})
    controller = RLHFController(cfg, run_dir)
    killed = []

    def inject(phase, i):
        restarts = controller.state["restarts"]["learner"]
        if (phase, i, restarts) == ("sync", 2, 0) and not killed:
            killed.append(("sync", controller.learners.pids[1]))
        elif (phase, i, restarts) == ("generate", 2, 1) and len(killed) == 1:
            killed.append(("generate", controller.learners.pids[1]))
        else:
            return
        os.kill(killed[-1][1], signal.SIGKILL)

    return run_dir, run_injected(controller, inject), killed


def test_learner_killed_during_sync_or_generate_loses_and_duplicates_nothing(learner_killed_outside_learn):
    run_dir, result, killed = learner_killed_outside_learn
    assert [phase for phase, _ in killed] == ["sync", "generate"]
    assert killed[0][1] != killed[1][1]  # the second kill hit the restarted group
    assert result["restarts_learner"] == 2
    rows = read_metrics(run_dir, "ppo")
    # Killed in iteration 2's sync: step 3 was logged, then found at the next command and rolled
    # back to the step-2 checkpoint; killed again in the redone step 3's generation: no row.
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4]
    faults = read_metrics(run_dir, "ppo_fault")
    assert [(f["step"], f["what"]) for f in faults] == [(2, "learner_restart")] * 2
    final = read_metrics(run_dir, "ppo", last_per_step=True)
    assert [r["step"] for r in final] == [1, 2, 3, 4]
    # 0 lost: every trained batch whole; 0 duplicated or replaced: the redone step drew the same samples.
    assert all(r["samples"] == BATCH and r["dropped_nonfinite"] == 0 for r in final)
    first, redo = rows[2], rows[3]
    assert redo["tokens_generated"] == first["tokens_generated"]
    assert redo["reward_pm"] == pytest.approx(first["reward_pm"], abs=1e-5)
    assert (run_dir / "policy" / "config.json").exists()


def test_async_run_redoes_a_batch_whose_generator_died_while_learning(ray_cluster, tiny_pm, tmp_path):
    """Async mode keeps one weights version: a generation worker killed while the learners
    train (the next batch being made with the version before) is replaced at the weight
    sync, and that batch is produced again with the new weights, at staleness 0."""
    import ray

    batch = 8
    cfg = tiny_config(**{"model.pm": tiny_pm, "ppo.mode": "async", "ppo.iterations": 3,
                         "ppo.rollout_batch_size": batch, "ppo.minibatch_size": batch,
                         "generation.num_workers": 2, "ppo.num_learners": 1, "ppo.checkpoint_every": 10,
                         "ppo.eval_prompts": 0})
    controller = RLHFController(cfg, tmp_path)
    killed = []

    def inject(phase, i):
        if (phase, i) == ("learn", 1) and not killed:
            killed.append(ray.get(controller.rollouts.pool.workers[0].info.remote())["pid"])
            os.kill(killed[0], signal.SIGKILL)

    run_injected(controller, inject)
    rows = read_metrics(tmp_path, "ppo")
    assert len(killed) == 1 and [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["staleness"] == 0  # batch 2 redone after the sync, with version 2
    assert [r["restarts_generation_total"] for r in rows] == [0, 1, 1]
    assert all(r["samples"] == batch for r in rows)
