"""Robustness (train-PM vs test-PM): the split, the curves' divergence point, and one small real run.

The math is checked on numbers worked out by hand; the integration test runs
the whole command on the tiny model (two PMs on a few hundred synthetic
comparisons, 2 PPO iterations) and then the report.
"""

import json
import math

import pytest

from hh_ray.robustness import (checkpoint_kl, divergence_point, gains, plot_robustness, robustness_table,
                               split_comparisons)


# ---------------------------------------------------------------- the split

def test_split_is_a_deterministic_partition():
    items = list(range(101))
    a, b = split_comparisons(items, seed=0)
    assert (len(a), len(b)) == (51, 50)  # the train half takes the odd one
    assert sorted(a + b) == items and not set(a) & set(b)
    assert split_comparisons(items, seed=0) == (a, b)  # same seed, same halves
    assert split_comparisons(items, seed=1)[0] != a  # another seed, another split
    assert a == sorted(a)  # each half keeps the data's order


def test_split_of_tiny_inputs():
    assert split_comparisons([], 0) == ([], [])
    assert split_comparisons(["x"], 0) == (["x"], [])


# ---------------------------------------------------------------- where the curves part

def test_gains_are_over_the_initial_policy():
    assert gains([1.0, 2.0, 0.5]) == [0.0, 1.0, -0.5]


def test_divergence_when_test_falls_while_train_rises():
    # gains: train 0, 1, 2, 3; test 0, .5, .8, .6 -> at k=3 train rose (2 -> 3) and test fell (.8 -> .6).
    k, why = divergence_point([0, 1, 2, 3], [0, 0.5, 0.8, 0.6], gap_threshold=5.0)
    assert k == 3 and "fell" in why


def test_opposite_moves_within_the_noise_floor_do_not_count():
    # gains: train 0, .04, 1; test 0, −.04, .2. At k=1 the moves (±.04) are below min_move .1;
    # at k=2 both rise, and the gap 1 − .2 = .8 exceeds .5.
    k, why = divergence_point([0, 0.04, 1.0], [0, -0.04, 0.2], gap_threshold=0.5, min_move=0.1)
    assert k == 2 and "gap" in why
    assert divergence_point([0, 0.04, 1.0], [0, -0.04, 0.2], gap_threshold=0.5)[0] == 1


def test_divergence_when_the_gap_exceeds_the_threshold():
    # Test never falls, but at k=2 the gap is 2 − 1 = 1 > 0.5 (at k=1 it is 1 − 0.9 = 0.1).
    k, why = divergence_point([0, 1, 2], [0, 0.9, 1.0], gap_threshold=0.5)
    assert k == 2 and "gap" in why


def test_offsets_between_pms_do_not_count():
    # Raw scores 10 vs −3: gains are 1 and 0.5, a gap of exactly the threshold (not above it).
    k, why = divergence_point([10.0, 11.0], [-3.0, -2.5], gap_threshold=0.5)
    assert k is None and "do not part" in why


def test_no_divergence_when_both_rise_together_and_bad_input():
    assert divergence_point([0, 1, 2], [0, 1, 2], 0.1)[0] is None
    # Train falling while test falls is not overoptimisation of the train PM.
    assert divergence_point([0, -1], [0, -1], 0.1)[0] is None
    with pytest.raises(ValueError):
        divergence_point([0, 1], [0], 0.5)


def test_checkpoint_kl_is_that_versions_rollouts_and_table():
    # Iteration i trains on version i−1's rollouts: version 0's KL is in row 1 (≈ 0, on-policy),
    # version 1's in row 2; version 2 (the last) made none, so row 2 (version 1's) stands in.
    rows = [{"step": 1, "kl": 0.0}, {"step": 2, "kl": 0.09}]
    assert checkpoint_kl(rows, 0) == (0.0, 0)
    assert checkpoint_kl(rows, 1) == (0.09, 1)
    assert checkpoint_kl(rows, 2) == (0.09, 1)
    with pytest.raises(ValueError):
        checkpoint_kl(rows, 4)
    t = robustness_table([0, 2], [0.0, 0.09], [1.0, 1.5], [2.0, 2.1], [0, 1])
    assert t[1]["sqrt_kl"] == pytest.approx(0.3) and t[1]["kl_of_version"] == 1
    assert (t[1]["gain_train_pm"], t[1]["gain_test_pm"], t[1]["gap"]) == pytest.approx((0.5, 0.1, 0.4))
    assert robustness_table([0], [-0.01], [0.0], [0.0])[0]["sqrt_kl"] == 0.0  # a negative k1 estimate is 0


def test_report_shows_robustness_from_the_real_writers(tmp_path):
    """The report's Robustness section from a robustness.json and PNG written by the module's own functions."""
    from hh_ray.report import write_report

    run = tmp_path / "run"
    (run / "robustness").mkdir(parents=True)
    table = robustness_table([0, 1, 2], [0.0, 0.25, 1.0], [0.0, 1.0, 2.0], [0.0, 0.8, 0.5])
    k, why = divergence_point([r["reward_train_pm"] for r in table], [r["reward_test_pm"] for r in table], 0.5)
    assert k == 2
    (run / "robustness" / "robustness.json").write_text(json.dumps(
        {"method": "split 50:50", "finding": f"part at 2: {why}", "divergence_iteration": 2, "table": table}))
    plot_robustness(table, k, run / "robustness" / "robustness.png")
    page = write_report(run).read_text()
    section = page.split('id="robustness"')[1].split("<h2")[0]
    assert "Finding." in section and "gain_test_pm" in section and 'src="data:image/png;base64,' in section
    assert "not available" not in page


# ---------------------------------------------------------------- the command, on the tiny model

def test_eval_robustness_end_to_end(ray_cluster, tiny_model, tmp_path):
    """Two tiny PMs on 270 synthetic comparisons each, PPO for 2 iterations with a checkpoint after
    each, every checkpoint scored by both PMs; then the report. A few minutes on 2 cores."""
    from hh_ray.orchestration.cli import main
    from hh_ray.data import load_comparisons
    from hh_ray.tracking import read_metrics

    run = tmp_path / "run"
    assert main(["eval", "robustness", "--config", "configs/tiny.yaml", "--run-dir", str(run),
                 "--model.policy", tiny_model, "--data.num_synthetic", "600", "--ppo.iterations", "2",
                 "--ppo.checkpoint_every", "1", "--ppo.eval_prompts", "4", "--num-prompts", "8",
                 "--samples-per-prompt", "2", "--tracking.wandb", "disabled"]) == 0
    folder = run / "robustness"

    # The halves the two PMs trained on: disjoint, 540 training pairs in all, none of them a held-out pair.
    # (Synthetic prompts repeat across pairs, so only whole pairs are checked.)
    half = {n: load_comparisons(str(folder / "data" / n), split="train") for n in ("train_pm", "test_pm")}
    held = load_comparisons(str(folder / "data" / "train_pm"), split="test")
    keys = {n: {(c.prompt, c.chosen, c.rejected) for c in cs} for n, cs in half.items()}
    assert (len(half["train_pm"]), len(half["test_pm"])) == (270, 270)
    assert not keys["train_pm"] & keys["test_pm"]
    assert not {(c.prompt, c.chosen, c.rejected) for c in held} & (keys["train_pm"] | keys["test_pm"])

    res = json.loads((folder / "robustness.json").read_text())
    table = res["table"]
    assert [r["iteration"] for r in table] == [0, 1, 2]
    ppo = read_metrics(folder / "ppo", "ppo", last_per_step=True)
    # Checkpoint k's KL is iteration k+1's logged KL (version k's rollouts); the last one borrows iteration 2's.
    logged = {r["step"]: r["kl"] for r in ppo}
    assert [r["kl"] for r in table] == pytest.approx([0.0, logged[2], logged[2]])
    assert [r["kl_of_version"] for r in table] == [0, 1, 1]
    assert all(math.isfinite(r["reward_train_pm"]) and math.isfinite(r["reward_test_pm"]) for r in table)
    assert table[0]["gain_train_pm"] == table[0]["gain_test_pm"] == 0.0
    assert 0.0 <= res["train_pm_heldout_accuracy"] <= 1.0 and 0.0 <= res["test_pm_heldout_accuracy"] <= 1.0
    assert (folder / "robustness.png").stat().st_size > 5_000

    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert 'id="robustness"' in page and "Finding." in page and "not available" not in page
