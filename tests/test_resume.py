"""Refusals that protect a run, equal learner shards, and a PPO resume past a corrupt checkpoint.

The refusals go through `hh-ray`'s `main` and must come before Ray starts: here
`ensure_ray` raises `RayStarted`, so a refusal returns 2 and a command that
passes its checks reaches it. One PPO run on the real local Ray cluster then
keeps K checkpoints and resumes, through the CLI, past a damaged newest one.
"""

import json
from pathlib import Path

import pytest
import torch

from hh_ray.checkpoint import PPO_CHECKPOINTS, checkpoint_dir, read_state, write_checkpoint
from hh_ray.config import save_config
from hh_ray.orchestration.cli import main
from hh_ray.rollout import RolloutBatch, drop_nonfinite
from tests.conftest import ROOT, tiny_config

TINY = str(ROOT / "configs" / "tiny.yaml")


class RayStarted(Exception):
    """Raised where the command would start Ray: its checks all passed."""


@pytest.fixture
def no_ray(monkeypatch):
    import hh_ray.orchestration.cluster as cluster

    def ensure_ray(*a, **kw):
        raise RayStarted

    monkeypatch.setattr(cluster, "ensure_ray", ensure_ray)


def small_checkpoint(root, step: int, **state):
    return write_checkpoint(checkpoint_dir(root, step), {"policy": {"w": torch.ones(2)}}, {},
                            {"iteration": step, **state})


def flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run_cli(args, capsys) -> tuple[int | str, str]:
    """(exit code, or 'ray' where it got as far as starting Ray; stderr and stdout)."""
    try:
        code = main(args)
    except RayStarted:
        code = "ray"
    out = capsys.readouterr()
    return code, out.err + out.out


# ---------------------------------------------------------------- equal DDP shards

def test_dropping_nonfinite_samples_keeps_equal_learner_shards():
    n = 10
    batch = RolloutBatch.from_samples([[1, 2]] * n, [[3, 4, 5]] * n, [[-0.5, -0.5, -0.5]] * n, [0] * n,
                                      [f"p{i}" for i in range(n)], ["r"] * n, ["stop"] * n, pad_id=0)
    batch.pm_score = torch.arange(n, dtype=torch.float32)
    batch.pm_score[3] = float("nan")
    batch.behaviour_logprobs[7, 3] = float("inf")
    kept, dropped = drop_nonfinite(batch, multiple=4)
    # 8 finite rows divide by 4 learners: only the 2 bad ones go
    assert dropped == 2 and kept.prompts == ["p0", "p1", "p2", "p4", "p5", "p6", "p8", "p9"]
    kept, dropped = drop_nonfinite(batch, multiple=3)
    # 8 finite rows, 3 learners: the last finite rows go too, the fewest to reach 6
    assert dropped == 4 and kept.prompts == ["p0", "p1", "p2", "p4", "p5", "p6"]
    for world in (1, 2, 3, 4, 5):
        kept, dropped = drop_nonfinite(batch, multiple=world)
        shards = [len(range(rank, len(kept), world)) for rank in range(world)]  # the learners' sharding
        assert len(set(shards)) == 1 and dropped == n - len(kept) and len(kept) == 8 - 8 % world
        assert torch.isfinite(kept.pm_score).all() and torch.isfinite(kept.behaviour_logprobs).all()
    batch.pm_score[3] = 3.0
    batch.behaviour_logprobs[7, 3] = -0.5
    same, none = drop_nonfinite(batch, multiple=5)  # nothing bad: the batch as it is
    assert none == 0 and same is batch


def test_dropping_nonfinite_samples_drops_whole_groups_and_keeps_equal_shards():
    """samples_per_prompt = 2: a bad sample takes its prompt's other sample with it (a group
    baseline needs both), and the learners, which are dealt whole groups, still get as many rows."""
    n = 12
    batch = RolloutBatch.from_samples([[1, 2]] * n, [[3, 4]] * n, [[-0.5, -0.5]] * n, [0] * n,
                                      [f"p{i // 2}" for i in range(n)], [f"r{i}" for i in range(n)], ["stop"] * n,
                                      pad_id=0)
    batch.group = torch.arange(n) // 2
    batch.pm_score = torch.zeros(n)
    batch.pm_score[5] = float("nan")  # group 2
    for world, want in ((1, 5), (2, 4), (3, 3), (4, 4)):
        kept, dropped = drop_nonfinite(batch, multiple=world)
        assert len(kept) == 2 * want and dropped == n - len(kept)
        assert "p2" not in kept.prompts and kept.group.tolist() == [g for g in range(want) for _ in (0, 1)]
        shards = [len(kept.shard_rows(rank, world)) for rank in range(world)]
        assert len(set(shards)) == 1, shards


def test_equal_shards_give_every_rank_the_same_number_of_steps():
    """What the DDP hang needed: ranks with unequal rows ran unequal micro-batch counts."""
    from learners.ppo_learner import micro_batches

    n, world, micro = 16, 2, 4
    batch = RolloutBatch.from_samples([[1]] * n, [[2, 3]] * n, [[-0.1, -0.1]] * n, [0] * n, ["p"] * n, ["r"] * n,
                                      ["stop"] * n, pad_id=0)
    batch.pm_score = torch.zeros(n)
    batch.pm_score[0] = float("nan")  # 15 rows left: 8 and 7 without the fix
    kept, _ = drop_nonfinite(batch, multiple=world)
    steps = []
    for rank in range(world):
        shard = kept.select(list(range(rank, len(kept), world)))
        steps.append(len(list(micro_batches(shard, list(range(len(shard))), micro))))
    assert len(kept) == 14 and steps == [2, 2]


# ---------------------------------------------------------------- refusals, before Ray starts

def test_train_ppo_refuses_a_folder_holding_a_ppo_run_and_writes_nothing(tmp_path, capsys, no_ray):
    with_ckpt = tmp_path / "ckpt"
    small_checkpoint(with_ckpt / PPO_CHECKPOINTS, 2)
    with_rows = tmp_path / "rows"
    with_rows.mkdir()
    (with_rows / "metrics.jsonl").write_text(json.dumps({"stage": "ppo_eval", "step": 0, "reward_pm_heldout": 0.1})
                                             + "\n")
    leftover = tmp_path / "leftover"
    (leftover / PPO_CHECKPOINTS / "step-000002.tmp-9").mkdir(parents=True)  # a first save, killed
    for run, sign in ((with_ckpt, "step-000002"), (with_rows, "1 PPO row"), (leftover, "step-000002.tmp-9")):
        before = listing(run)
        code, err = run_cli(["train-ppo", "--config", TINY, "--run-dir", str(run)], capsys)
        assert code == 2 and "already holds a PPO run" in err and sign in err and "--resume" in err, err
        assert "\n" not in err.strip() and listing(run) == before  # one line; nothing written


def test_train_ppo_into_the_folder_of_a_pm_run_is_allowed(tmp_path, capsys, no_ray):
    """The demo trains its PM, then runs PPO in the same folder."""
    run = tmp_path / "run"
    small_checkpoint(run / "checkpoints", 20)  # the PM's checkpoints, beside where PPO's go
    (run / "metrics.jsonl").write_text(json.dumps({"stage": "pm_finetune", "step": 1}) + "\n")
    assert run_cli(["train-ppo", "--config", TINY, "--run-dir", str(run)], capsys)[0] == "ray"
    assert run_cli(["train-ppo", "--config", TINY, "--run-dir", str(tmp_path / "new")], capsys)[0] == "ray"


def test_resume_without_a_usable_checkpoint_is_an_error_saying_where_it_looked(tmp_path, capsys, no_ray):
    for stage, root in (("train-ppo", PPO_CHECKPOINTS), ("train-pm", "checkpoints"), ("distill", "checkpoints"),
                        ("sft", "checkpoints")):
        run = tmp_path / stage
        run.mkdir()
        code, err = run_cli([stage, "--config", TINY, "--run-dir", str(run), "--resume"], capsys)
        assert code == 2 and f"no usable checkpoint under {run / root}" in err, err
        small_checkpoint(run / root, 4)
        flip_byte(checkpoint_dir(run / root, 4) / "policy.safetensors")
        code, err = run_cli([stage, "--config", TINY, "--run-dir", str(run), "--resume"], capsys)
        assert code == 2 and "all 1 there are corrupt or incomplete" in err, err
        assert "skipping" in err and "policy.safetensors differs" in err


def test_resume_skips_a_corrupt_newest_checkpoint_and_cleans_leftovers(tmp_path, capsys, no_ray):
    run = tmp_path / "run"
    root = run / PPO_CHECKPOINTS
    for step in (2, 4):
        small_checkpoint(root, step)
    flip_byte(checkpoint_dir(root, 4) / "policy.safetensors")
    (root / "step-000006.tmp-123").mkdir()
    code, out = run_cli(["train-ppo", "--config", TINY, "--run-dir", str(run), "--resume"], capsys)
    assert code == "ray", out
    assert "skipping" in out and "step-000004" in out and f"resuming from {checkpoint_dir(root, 2)}" in out
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]  # the leftover is gone


def test_other_stages_refuse_a_folder_with_checkpoints_without_resume(tmp_path, capsys, no_ray):
    for stage in ("train-pm", "distill", "sft"):
        run = tmp_path / stage
        small_checkpoint(run / "checkpoints", 10)
        before = listing(run)
        code, err = run_cli([stage, "--config", TINY, "--run-dir", str(run)], capsys)
        assert code == 2 and "already holds checkpoints" in err and "--resume" in err, err
        assert listing(run) == before
        assert run_cli([stage, "--config", TINY, "--run-dir", str(run), "--resume"], capsys)[0] == "ray"


@pytest.mark.parametrize("stage,section,flags,differ", [
    ("train-ppo", "ppo", ["--seed", "5", "--ppo.rollout_batch_size", "32", "--data.num_synthetic", "100"],
     ["seed: 0 (run) vs 5 (now)", "ppo.rollout_batch_size: 16 (run) vs 32 (now)",
      "data.num_synthetic: 2000 (run) vs 100 (now)"]),
    ("train-ppo", "ppo", ["--model.policy", "smollm2"], ["model.policy: 'tiny' (run) vs 'smollm2' (now)"]),
    ("train-pm", "pm", ["--pm.batch_size", "64"], ["pm.batch_size: 32 (run) vs 64 (now)"]),
    ("distill", "distill", ["--distill.corpus", "x.txt"], ["distill.corpus: 'synthetic' (run) vs 'x.txt' (now)"]),
])
def test_resume_with_a_changed_config_is_refused_unless_allowed(tmp_path, capsys, no_ray, stage, section, flags,
                                                                differ):
    run = tmp_path / "run"
    run.mkdir()
    save_config(tiny_config(), run / "config.yaml")
    small_checkpoint(run / (PPO_CHECKPOINTS if section == "ppo" else "checkpoints"), 2)
    code, err = run_cli([stage, "--run-dir", str(run), "--resume", *flags], capsys)
    assert code == 2 and "--allow-config-change" in err and str(run / "config.yaml") in err, err
    for d in differ:
        assert d in err
    # One line of error; anything else on stderr is a line Ray forwards from the session's cluster.
    lines = [line for line in err.strip().splitlines() if "pid=" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"hh-ray {stage}: error:"), err
    # the same from a --config file
    code, err = run_cli([stage, "--config", TINY, "--run-dir", str(run), "--resume", *flags], capsys)
    assert code == 2 and differ[0] in err
    assert run_cli([stage, "--run-dir", str(run), "--resume", "--allow-config-change", *flags], capsys)[0] == "ray"
    # what a position does not depend on may change
    assert run_cli([stage, "--run-dir", str(run), "--resume", f"--{section}.lr", "0.5"], capsys)[0] == "ray"


# ---------------------------------------------------------------- PPO on the real cluster

def test_ppo_keeps_k_checkpoints_and_resumes_past_a_corrupt_newest(ray_cluster, tiny_pm, tmp_path, capsys,
                                                                    monkeypatch):
    from hh_ray.orchestration.controller import RLHFController
    from hh_ray.tracking import read_metrics

    # A relative --run-dir: the learners, whose working directory is Ray's, write into the same folder.
    monkeypatch.chdir(tmp_path)
    run = Path("run")
    root = run / PPO_CHECKPOINTS
    flags = ["--model.pm", tiny_pm, "--ppo.checkpoint_every", "1", "--ppo.keep_checkpoints", "2",
             "--ppo.rollout_batch_size", "8", "--ppo.minibatch_size", "8", "--ppo.eval_prompts", "0",
             "--tracking.wandb", "disabled"]
    assert main(["train-ppo", "--config", TINY, "--run-dir", str(run), "--ppo.iterations", "3", *flags]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000003"]  # step 1 pruned
    assert (tmp_path / "run" / "policy" / "config.json").exists()
    capsys.readouterr()
    # a second fresh run into it is refused by the CLI, and by the controller for library callers
    assert main(["train-ppo", "--config", TINY, "--run-dir", str(run), *flags]) == 2
    assert "already holds a PPO run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="already holds PPO checkpoints"):
        RLHFController(tiny_config(**{"model.pm": tiny_pm}), run)

    flip_byte(checkpoint_dir(root, 3) / "policy.safetensors")
    assert main(["train-ppo", "--run-dir", str(run), "--resume", "--ppo.iterations", "4"]) == 0
    out = capsys.readouterr().out
    assert "skipping" in out and "step-000003" in out and "policy.safetensors differs" in out
    # iteration 3 redone from the step-2 checkpoint, then 4; each logged once more
    assert [r["step"] for r in read_metrics(run, "ppo")] == [1, 2, 3, 3, 4]
    assert read_state(checkpoint_dir(root, 4))["iteration"] == 4
    # the newest 2, and the one the run resumed from (a restarted learner group reloads it first)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000003", "step-000004"]
    assert (run / "policy" / "config.json").exists()
