"""PM math against numbers worked out by hand, and `eval pm` on a tiny model (no Ray)."""

import json
import math

import pytest
import torch

from hh_ray.config import load_config
from hh_ray.data import Comparison
from hh_ray.pm_eval import (accuracy, accuracy_by_turns, eval_pm_command, expected_calibration_error,
                            pairwise_loss, pm_metrics, reliability_bins, score_comparisons)

LN3 = math.log(3.0)  # σ(ln 3) = 3/4


def test_pairwise_loss_by_hand():
    # diffs 1 and 0: (log(1 + e^-1) + log 2) / 2
    got = pairwise_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert got.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(2)) / 2, abs=1e-6)
    assert got.item() == pytest.approx(0.503204, abs=1e-6)


def test_pairwise_loss_is_stable_for_large_margins():
    # a naive log(sigmoid(-100)) underflows to -inf
    assert pairwise_loss(torch.tensor([0.0]), torch.tensor([100.0])).item() == pytest.approx(100.0)
    assert pairwise_loss(torch.tensor([100.0]), torch.tensor([0.0])).item() == pytest.approx(0.0, abs=1e-6)


def test_accuracy_counts_ties_as_half():
    r_c, r_r = torch.tensor([2.0, 0.0, 1.0, 3.0]), torch.tensor([1.0, 0.0, 2.0, 0.0])
    # right, tie, wrong, right
    assert accuracy(r_c, r_r) == pytest.approx(2.5 / 4)
    by_turn = accuracy_by_turns(r_c, r_r, [1, 1, 2, 2])
    assert by_turn == {1: {"accuracy": 0.75, "n": 2}, 2: {"accuracy": 0.5, "n": 2}}


def test_ece_by_hand():
    # Three pairs predicted at P=0.75, P=0.75, P=0.25 (chosen won every time).
    # Both orderings: bin 0.7-0.8 holds 0.75 ×3 with outcomes (1, 1, 0): observed 2/3;
    # bin 0.2-0.3 is its mirror, observed 1/3. ECE = ½·|0.75 − 2/3| + ½·|0.25 − 1/3| = 1/12.
    r_c, r_r = torch.tensor([LN3, LN3, -LN3]), torch.zeros(3)
    bins = reliability_bins(r_c, r_r)
    filled = {round(b["lo"], 1): b for b in bins if b["n"]}
    assert set(filled) == {0.2, 0.7}
    assert filled[0.7]["n"] == 3 and filled[0.7]["observed"] == pytest.approx(2 / 3)
    assert filled[0.7]["mean_predicted"] == pytest.approx(0.75)
    assert filled[0.2]["observed"] == pytest.approx(1 / 3)
    assert expected_calibration_error(bins) == pytest.approx(1 / 12, abs=1e-6)


def test_ece_is_zero_when_calibrated_and_large_when_overconfident():
    # P=0.75 and right 3 times in 4: perfectly calibrated.
    calibrated = reliability_bins(torch.tensor([LN3, LN3, LN3, -LN3]), torch.zeros(4))
    assert expected_calibration_error(calibrated) == pytest.approx(0.0, abs=1e-6)
    # P≈1 but right only half the time: ECE ≈ 0.5. P=1.0 lands in the last bin, not past it.
    overconfident = reliability_bins(torch.tensor([100.0, -100.0]), torch.zeros(2))
    assert sum(b["n"] for b in overconfident) == 4
    assert expected_calibration_error(overconfident) == pytest.approx(0.5, abs=1e-6)


def test_pm_metrics_is_json_serialisable():
    m = pm_metrics(torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.0, 0.0, 0.0]), [1, 2, 2])
    assert m["n"] == 3 and m["accuracy"] == pytest.approx(2 / 3)
    json.dumps(m)


# ---------------------------------------------------------------- scoring with a real (tiny) model

def _pairs():
    return [Comparison("\n\nHuman: hi\n\nAssistant:", " glad to help.", " no."),
            Comparison("\n\nHuman: chess?\n\nAssistant: sure.\n\nHuman: more?\n\nAssistant:", " happy to.", " meh."),
            Comparison("\n\nHuman: " + "word " * 400 + "\n\nAssistant:", " sure thanks.", " later.")]


def test_scores_are_batch_invariant_and_survive_over_long_transcripts(tiny_model):
    from hh_ray.models import load_scalar_head_model

    torch.manual_seed(0)
    model, tok = load_scalar_head_model(tiny_model)
    one = score_comparisons(model, tok, _pairs(), max_len=64, batch_size=1)
    three = score_comparisons(model, tok, _pairs(), max_len=64, batch_size=3)
    # right padding with the PM's own pad token must not move the score
    assert torch.allclose(one[0], three[0], atol=1e-5) and torch.allclose(one[1], three[1], atol=1e-5)
    assert torch.isfinite(one[0]).all() and not model.training


def test_eval_pm_command_writes_table_json_and_plots(tiny_model, tmp_path, capsys):
    from hh_ray.models import load_scalar_head_model, save_model

    torch.manual_seed(0)
    model, tok = load_scalar_head_model(tiny_model)
    pm_dir = save_model(model, tok, tmp_path / "pm")
    cfg = load_config("configs/tiny.yaml", {"data.num_synthetic": 200, "tracking.wandb": "disabled"})
    assert eval_pm_command(cfg, tmp_path / "run", str(pm_dir), None) == 0
    out = tmp_path / "run" / "pm_eval"
    results = json.loads((out / "pm_eval.json").read_text())
    assert results["n"] == 20  # the 10% held out of 200
    assert 0.0 <= results["ece"] <= 1.0
    for png in ("reliability.png", "scores.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "ECE" in printed


def test_eval_pm_command_refuses_a_missing_pm(tmp_path):
    cfg = load_config("configs/tiny.yaml", {"tracking.wandb": "disabled"})
    assert eval_pm_command(cfg, tmp_path, str(tmp_path / "nope"), None) == 2
