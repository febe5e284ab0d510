"""The paper's evaluations: Elo, best-of-n, OOD detection and the HTML report.

Known answers worked out by hand (or by a direct numpy computation), and a
report built from a run folder written here: the report only reads files.
"""

import json
import math
import re

import numpy as np
import pytest

from hh_ray.best_of_n import (best_of_n_curve, best_of_n_kl_exact, best_of_n_kl_log_n, expected_best_of_n,
                              max_weights)
from hh_ray.elo import (ELO_PER_PM_UNIT, elo_difference, fit_elo, judged_wins, log_likelihood, soft_wins, win_matrix,
                        win_probability)
from hh_ray.ood import (OODDetector, auroc, diagonal_mahalanobis, fit_gaussian, fit_linear_probe, mahalanobis,
                        relative_mahalanobis)
from hh_ray.ood_eval import absolute_ridge, evaluate_layer


# ---------------------------------------------------------------- Elo

def test_win_probability_by_hand():
    assert win_probability(0) == pytest.approx(0.5)
    assert win_probability(400) == pytest.approx(10 / 11)  # 1 / (1 + 10^-1)
    assert win_probability(-400) == pytest.approx(1 / 11)
    assert elo_difference(10 / 11) == pytest.approx(400)


def test_judged_wins_count_the_higher_score_and_drop_ties():
    # Three players on three prompts; on prompt 3 players 0 and 1 tie (dropped).
    scores = np.array([[1.0, 0.0, 2.0],
                       [0.5, 0.5, 2.0],
                       [0.0, 1.0, 3.0]])
    w, ties = judged_wins(scores)
    assert w.tolist() == [[0, 1, 1], [1, 0, 1], [2, 2, 0]]
    assert ties == 1


def test_soft_wins_by_hand():
    # Two players, two prompts: gaps +1 and -1 give σ(1) + σ(-1) = 1 game each way; a gap of 0 is half a game.
    w = soft_wins(np.array([[1.0, 0.0], [0.0, 1.0]]))
    np.testing.assert_allclose(w, [[0.0, 1.0], [1.0, 0.0]])
    w = soft_wins(np.array([[2.0], [2.0], [0.0]]))
    s2 = 1 / (1 + math.exp(-2))
    np.testing.assert_allclose(w, [[0, 0.5, s2], [0.5, 0, s2], [1 - s2, 1 - s2, 0]])


def test_174_elo_per_pm_unit():
    # A PM gap of 1 is P = σ(1) = 0.7311; the Elo gap giving that win probability is 173.7.
    assert ELO_PER_PM_UNIT == pytest.approx(elo_difference(1 / (1 + math.exp(-1))))
    assert ELO_PER_PM_UNIT == pytest.approx(173.72, abs=0.01)


def test_elo_two_players_by_hand():
    # A beats B 3 times out of 4: the MLE sets P(A>B) = 3/4, ΔElo = 400·log10(3) = 190.85
    elo = fit_elo(np.array([[0, 3], [1, 0]]))
    assert elo[0] - elo[1] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert elo.sum() == pytest.approx(0, abs=1e-9)


def test_elo_recovers_ratings_from_a_consistent_win_matrix():
    # Expected wins over 1000 games per pair at ratings (+200, 0, -200) are the MLE's fixed point.
    true = np.array([200.0, 0.0, -200.0])
    p = win_probability(true[:, None] - true[None, :])
    w = 1000 * p * (1 - np.eye(3))
    assert fit_elo(w) == pytest.approx(true, abs=1e-4)


def test_elo_from_simulated_games_and_mle_property():
    rng = np.random.default_rng(0)
    true = np.array([300.0, 100.0, -50.0, -350.0])
    games = [(i, j, float(rng.random() < win_probability(true[i] - true[j])))
             for _ in range(400) for i in range(4) for j in range(i + 1, 4)]
    w = win_matrix(4, games)
    elo = fit_elo(w)
    assert elo == pytest.approx(true - true.mean(), abs=40)
    # A maximum: moving any rating lowers the likelihood.
    for k in range(4):
        bumped = elo.copy()
        bumped[k] += 5
        assert log_likelihood(w, bumped) < log_likelihood(w, elo)


def test_elo_finite_when_one_player_wins_everything():
    elo = fit_elo(np.array([[0, 5], [0, 0]]))
    assert np.all(np.isfinite(elo)) and elo[0] > elo[1]


# ---------------------------------------------------------------- best-of-n

def test_best_of_n_kl_both_ways_by_hand():
    # The paper's value, log n ...
    assert best_of_n_kl_log_n(1) == 0.0
    assert best_of_n_kl_log_n(2) == pytest.approx(0.69315, abs=1e-5)
    assert best_of_n_kl_log_n(16) == pytest.approx(2.77259, abs=1e-5)
    # ... and the closed form log n − (n−1)/n, below it by (n−1)/n.
    assert best_of_n_kl_exact(1) == 0.0
    assert best_of_n_kl_exact(2) == pytest.approx(0.19315, abs=1e-5)  # 0.69315 − 0.5
    assert best_of_n_kl_exact(4) == pytest.approx(0.63629, abs=1e-5)  # 1.38629 − 0.75
    assert best_of_n_kl_exact(16) == pytest.approx(1.83509, abs=1e-5)  # 2.77259 − 0.9375
    for kl in (best_of_n_kl_log_n, best_of_n_kl_exact):
        with pytest.raises(ValueError):
            kl(0)


def test_expected_best_of_n_by_hand():
    # Scores 1, 2, 3: best of 2 over the three pairs is (2 + 3 + 3) / 3
    s = np.array([[3.0, 1.0, 2.0]])
    assert expected_best_of_n(s, 1) == pytest.approx(2.0)
    assert expected_best_of_n(s, 2) == pytest.approx(8 / 3)
    assert expected_best_of_n(s, 3) == pytest.approx(3.0)
    assert max_weights(3, 2) == pytest.approx([0, 1 / 3, 2 / 3])


def test_best_of_n_curve_matches_random_subsets():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(5, 8))
    curve = best_of_n_curve(s)
    assert [r["n"] for r in curve] == [1, 2, 4, 8]
    # Monte Carlo over random 4-subsets agrees with the exact estimate.
    mc = np.mean([s[p, rng.choice(8, 4, replace=False)].max() for _ in range(4000) for p in range(5)])
    assert curve[2]["reward_pm"] == pytest.approx(mc, abs=0.03)
    # Every row carries the KL both ways, labelled, and no unlabelled "kl".
    assert curve[3]["kl_log_n"] == pytest.approx(math.log(8)) and curve[3]["sqrt_kl_log_n"] == pytest.approx(
        math.sqrt(math.log(8)))
    assert curve[3]["kl_exact"] == pytest.approx(math.log(8) - 7 / 8) and curve[3]["sqrt_kl_exact"] == pytest.approx(
        math.sqrt(math.log(8) - 7 / 8))
    assert all("kl" not in r and "sqrt_kl" not in r for r in curve)


# ---------------------------------------------------------------- OOD

def test_auroc_by_hand():
    assert auroc([0, 1], [2, 3]) == 1.0
    assert auroc([2, 3], [0, 1]) == 0.0
    # (out, in) pairs: (2,1) win, (2,3) loss, (3,1) win, (3,3) tie -> (2 + 0.5) / 4
    assert auroc([1, 3], [2, 3]) == pytest.approx(0.625)


def test_mahalanobis_on_2d_gaussian():
    # Σ = [[4, 0], [0, 1]], μ = 0: the point (2, 1) is at squared distance 4/4 + 1/1 = 2.
    mean = np.zeros(2)
    assert mahalanobis(np.array([[2.0, 1.0]]), mean, np.diag([0.25, 1.0])) == pytest.approx([2.0])
    # Correlated Σ = [[1, .8], [.8, 1]]: (1, 1) is close (along the correlation), (1, -1) far.
    cov = np.array([[1.0, 0.8], [0.8, 1.0]])
    x = np.array([[1.0, 1.0], [1.0, -1.0]])
    assert mahalanobis(x, mean, np.linalg.inv(cov)) == pytest.approx([2 / 1.8, 2 / 0.2])
    # Relative = full − diagonal; the diagonal variances here are 1, distance 2 for both points.
    assert relative_mahalanobis(x, mean, np.linalg.inv(cov), np.ones(2)) == pytest.approx([2 / 1.8 - 2, 2 / 0.2 - 2])


def test_fit_gaussian_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.multivariate_normal([1.0, -1.0], [[2.0, 0.6], [0.6, 0.5]], size=5000)
    mean, precision, variance = fit_gaussian(x, ridge=0.0)
    cov = np.cov(x.T, bias=True)
    assert mean == pytest.approx(x.mean(0))
    y = x[:3]
    direct = [(r - x.mean(0)) @ np.linalg.inv(cov) @ (r - x.mean(0)) for r in y]
    assert mahalanobis(y, mean, precision) == pytest.approx(direct)
    assert diagonal_mahalanobis(y, mean, variance) == pytest.approx((((y - x.mean(0)) ** 2) / np.diag(cov)).sum(1))
    # The eval's ridge is relative to the mean unit variance: 0.1 · (2 + 0.5) / 2 ≈ 0.125
    assert absolute_ridge(x, 0.1) == pytest.approx(0.1 * np.trace(cov) / 2)


def test_saved_detector_scores_what_was_measured(tmp_path):
    rng = np.random.default_rng(3)
    x_in = rng.multivariate_normal([0, 0], [[1.0, 0.9], [0.9, 1.0]], size=400)
    # OOD points break the correlation without being far per coordinate: only the full covariance sees them.
    x_out = rng.multivariate_normal([0, 0], [[1.0, -0.9], [-0.9, 1.0]], size=400)
    det = OODDetector.fit(x_in[:200], layer=3, ridge=0.0)
    assert auroc(det.score(x_in[200:]), det.score(x_out)) > 0.85
    det.threshold = 1.5
    back = OODDetector.load(det.save(tmp_path / "det"))
    assert back.layer == 3 and back.threshold == 1.5 and back.method == "relative_mahalanobis"
    assert back.score(x_out[:5]) == pytest.approx(det.score(x_out[:5]))


def test_evaluate_layer_reports_every_method():
    rng = np.random.default_rng(5)
    h_in = rng.normal(0, 1, (120, 4))
    h_out = rng.normal(0, 1, (60, 4)) + [2.0, 0, 0, 0]
    r = evaluate_layer(h_in, h_out, num_fit=80, shots=[4, 16])
    assert set(r) == {"auroc_relative_mahalanobis", "auroc_mahalanobis", "auroc_probe_4shot", "auroc_probe_16shot"}
    assert r["auroc_mahalanobis"] > 0.8 and r["auroc_probe_16shot"] > 0.8


def test_linear_probe_learns_a_separating_direction():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(0, 1, (100, 5)), rng.normal(0, 1, (5, 5)) + [3, 0, 0, 0, 0]])
    y = np.r_[np.zeros(100), np.ones(5)]
    w, b = fit_linear_probe(x, y)
    test_in, test_out = rng.normal(0, 1, (200, 5)), rng.normal(0, 1, (200, 5)) + [3, 0, 0, 0, 0]
    assert auroc(test_in @ w + b, test_out @ w + b) > 0.9


# ---------------------------------------------------------------- the report

def _fake_run(run_dir):
    """A run folder as train-pm, train-ppo and the evals leave it (written by hand here)."""
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: 0\nppo:\n  kl_coef: 0.001\n")
    rows = [{"stage": "pm", "step": s, "loss": 0.7 - 0.01 * s, "accuracy": 0.5 + 0.01 * s} for s in range(5)]
    rows += [{"stage": "ppo", "step": s, "kl": 0.04 * s * s, "sqrt_kl": 0.2 * s, "reward_pm": 0.1 + 0.5 * 0.2 * s,
              "policy_loss": -0.01, "response_length": 30 + s} for s in range(6)]
    rows += [{"stage": "ppo_eval", "step": 0, "reward_pm_heldout": 0.1},
             {"stage": "ppo_eval", "step": 5, "reward_pm_heldout": 0.6}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "elo").mkdir()
    (run_dir / "elo" / "elo.json").write_text(json.dumps(
        {"method": "PM as judge", "table": [{"model": "init", "elo": -50.0}, {"model": "iter-5", "elo": 50.0}]}))


def test_report_shows_every_section(tmp_path):
    from hh_ray.report import write_report

    run = tmp_path / "run"
    _fake_run(run)
    page = write_report(run).read_text()
    # results first, the curves after them, the config last and collapsed
    order = [page.index(f'id="{section}"') for section in ("headline", "reward-kl", "elo", "metrics", "not-run",
                                                             "config")]
    assert order == sorted(order)
    assert "<details><summary>config.yaml" in page and "<details open" not in page
    assert "kl_coef: 0.001" in page and "iter-5" in page and "PM as judge" in page
    # Fit on the exact line reward = 0.1 + 0.5·√KL
    assert re.search(r"<td>0\.1</td><td>0\.5</td><td>1</td>", page)
    # curves of the pm, ppo and ppo_eval stages, and reward vs √KL
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 4
    assert "best_of_n" in page.split('id="not-run"')[1]  # evaluations without data are named, not drawn


def test_only_series_that_vary_are_curves():
    from hh_ray.report import is_curve, stage_series

    assert is_curve([1.0, 2.0]) and not is_curve([3.0]) and not is_curve([0.1, 0.1, 0.1]) and not is_curve([])
    rows = [{"stage": "pm_finetune", "step": s, "global_step": s, "stage_step": s, "epoch": 0, "lr": 1e-5,
             "loss": 0.7 - 0.1 * s, "seen_digest": "x"} for s in (1, 2, 3)]
    curves, constants = stage_series(rows)
    assert curves == {"loss": [(1, pytest.approx(0.6)), (2, pytest.approx(0.5)), (3, pytest.approx(0.4))]}
    assert constants == {"epoch": 0, "lr": 1e-5}  # positions (global/stage step) and strings are neither
    assert stage_series([{"stage": "pm_data", "step": 0, "train_pairs": 1800}]) == ({}, {"train_pairs": 1800})


def test_headline_numbers_by_hand():
    from hh_ray.report import headline_numbers

    rows = [{"stage": "ppo", "step": s, "kl": 0.04 * s * s, "reward_pm": 0.1 + 0.5 * 0.2 * s} for s in range(1, 4)]
    rows += [{"stage": "ppo_eval", "step": 0, "reward_pm_heldout": 0.25},
             {"stage": "ppo_eval", "step": 3, "reward_pm_heldout": 0.75},
             {"stage": "pm_eval", "step": 9, "accuracy": 0.6, "ece": 0.1}]
    got = {r["result"]: r["value"] for r in headline_numbers(rows, None)}
    assert got == pytest.approx({
        "held-out PM reward, before PPO (π₀)": 0.25, "held-out PM reward, after PPO": 0.75,
        "held-out PM reward, gain": 0.5, "PM held-out accuracy": 0.6, "PM expected calibration error (ECE)": 0.1,
        "reward vs √KL: slope b": 0.5, "reward vs √KL: intercept a": 0.1, "reward vs √KL: R²": 1.0})
    # pm_eval/pm_eval.json, when there, is the source (it says how many pairs)
    from_json = headline_numbers(rows, {"n": 40, "accuracy": 0.7, "ece": 0.2})
    assert [r["from"] for r in from_json if r["result"] == "PM held-out accuracy"] == [
        "pm_eval/pm_eval.json (40 held-out pairs)"]
    # one PPO iteration and no evaluation: nothing to fit, nothing before/after
    assert headline_numbers([{"stage": "ppo", "step": 1, "kl": 0.1, "reward_pm": 0.2}], None) == []


def test_few_samples_are_from_the_first_and_last_iteration():
    from hh_ray.report import few_samples

    samples = [{"step": s, "index": i} for s in (1, 2, 3) for i in range(4)]
    assert [(r["step"], r["index"]) for r in few_samples(samples, 2)] == [(1, 0), (1, 1), (3, 0), (3, 1)]
    assert [(r["step"], r["index"]) for r in few_samples(samples[:4], 2)] == [(1, 0), (1, 1)]
    assert few_samples([]) == []


def test_report_of_one_ppo_iteration_plots_no_point(tmp_path):
    from hh_ray.report import write_report
    from hh_ray.reward_kl import plot_reward_vs_sqrt_kl

    assert plot_reward_vs_sqrt_kl([{"kl": 0.5, "reward_pm": 0.1}], tmp_path / "p.png") is None
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"stage": "ppo", "step": 1, "kl": 0.5, "reward_pm": 0.1}) + "\n")
    page = write_report(run).read_text()
    assert "data:image/png" not in page and "a relation needs two or more" in page
    assert "ppo</b>, not plotted (one value): kl = 0.5, reward_pm = 0.1" in page


def test_report_cli(tmp_path, capsys):
    from hh_ray.orchestration.cli import main

    run = tmp_path / "run"
    _fake_run(run)
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").stat().st_size > 10_000
    assert main(["report", str(tmp_path / "nope")]) == 2


# ---------------------------------------------------------------- the commands, on the tiny model

@pytest.fixture(scope="module")
def tiny_pm(tiny_model, tmp_path_factory):
    """An untrained PM (random head on the tiny LM): enough to exercise the plumbing, not the numbers."""
    import torch

    from hh_ray.models import load_scalar_head_model, save_model

    torch.manual_seed(0)
    model, tok = load_scalar_head_model(tiny_model)
    return str(save_model(model, tok, tmp_path_factory.mktemp("pm") / "pm"))


def test_policy_sampler_draws_n_per_prompt_with_common_seeds_and_swaps_weights(ray_cluster, tiny_model,
                                                                               tiny_chat_model, tmp_path, capsys):
    import shutil

    import torch

    from hh_ray.models import load_policy, load_tokenizer
    from hh_ray.orchestration.sampling import PolicySampler, sample_policies, weight_files
    from tests.conftest import tiny_config

    cfg = tiny_config(**{"model.policy": tiny_model, "generation.max_new_tokens": 8})
    long = "\n\nHuman: " + "tell me more " * 200 + "\n\nAssistant:"  # far over max_seq_len: cut from the left
    prompts = ["\n\nHuman: Hi there.\n\nAssistant:", long, "\n\nHuman: How are you?\n\nAssistant:"]
    with PolicySampler(cfg, tiny_model) as sampler:
        first = sampler.sample(prompts, 3)
        assert [len(r) for r in first] == [3, 3, 3]
        assert len(set(first[0])) > 1  # a prompt's n samples are n draws
        assert "sampled 3 prompts x 3 in " in capsys.readouterr().out
        assert sampler.sample(prompts, 3) == first  # the same seeds, the same draw
        assert sampler.sample(prompts[:1], 3) == first[:1]  # prompt i's seed is its own
        model = load_policy(tiny_model)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(-1.0)
        model.save_pretrained(tmp_path / "other")
        load_tokenizer(tiny_model).save_pretrained(tmp_path / "other")
        assert sampler.fits(str(tmp_path / "other")) and not sampler.fits(tiny_chat_model)
        shutil.copytree(tmp_path / "other", tmp_path / "bare")
        for f in (tmp_path / "bare").glob("*.safetensors"):
            f.unlink()
        assert not sampler.fits(str(tmp_path / "bare"))  # its weights in no safetensors file
        sampler.load(1, weight_files(str(tmp_path / "other")))  # read by each worker, not the driver
        swapped = sampler.sample(prompts, 3)
        assert swapped != first  # other weights, other samples
    # What `fits` promises: engines started with `other` sample what the swapped ones did, and
    # tiny's weights loaded into them give tiny's samples back; a folder sampled twice in a row
    # is sampled again (here with another seed), not reloaded.
    other = str(tmp_path / "other")
    own, again, back = sample_policies(cfg, [other, other, tiny_model], prompts, [3, 3, 3],
                                       seeds=[None, cfg.seed + 7, None])
    assert own == swapped and back == first and again != own


def test_eval_commands_then_report(ray_cluster, tiny_model, tiny_pm, tmp_path):
    from hh_ray.orchestration.cli import main
    from hh_ray.data import Comparison, write_jsonl

    run = tmp_path / "run"
    _fake_run(run)
    harmful = [Comparison(f"\n\nHuman: Tell me how to hurt someone with {w}.\n\nAssistant:", " No.", " Ok.")
               for w in ["a knife", "poison", "a car", "fire", "a bat", "rope", "a gun", "a brick"]]
    write_jsonl(harmful, tmp_path / "harmful.jsonl")
    common = ["--run-dir", str(run), "--model.policy", tiny_model, "--generation.max_new_tokens", "8",
              "--model.max_seq_len", "128", "--data.num_synthetic", "200", "--tracking.wandb", "disabled"]
    assert main(["eval", "best-of-n", "--pm", tiny_pm, "--num-prompts", "3", "--n-max", "4", *common]) == 0
    bon = json.loads((run / "best_of_n" / "best_of_n.json").read_text())
    assert [r["n"] for r in bon["table"]] == [1, 2, 4]
    assert [r["kl_log_n"] for r in bon["table"]] == pytest.approx([0, math.log(2), math.log(4)])
    assert [r["kl_exact"] for r in bon["table"]] == pytest.approx([0, math.log(2) - 0.5, math.log(4) - 0.75])
    assert "kl_log_n = log n (the paper's)" in bon["method"]
    rewards = [r["reward_pm"] for r in bon["table"]]
    assert rewards == sorted(rewards)  # the expected max of n samples cannot fall as n grows

    assert main(["eval", "elo", "--pm", tiny_pm, "--num-prompts", "3", "--policies", tiny_model, "tiny",
                 "--best-of", "4", *common]) == 0
    elo = json.loads((run / "elo" / "elo.json").read_text())
    assert [r["model"] for r in elo["table"]][2].startswith("best-of-4 of ")
    for key in ("elo", "elo_soft", "elo_174_pm"):
        assert sum(r[key] for r in elo["table"]) == pytest.approx(0, abs=1e-4)  # float32 scores
    by_name = {r["model"]: r for r in elo["table"]}
    # The chooser is the judge here, so best-of-4 never scores below its policy's first sample.
    first, best = elo["table"][0], elo["table"][2]
    assert best["mean_pm_score"] >= first["mean_pm_score"] and len(by_name) == 3

    assert main(["eval", "ood", "--harmful", str(tmp_path / "harmful.jsonl"), "--num-prompts", "16",
                 "--layers", "1", "2", "--shots", "2", *common]) == 0
    ood = json.loads((run / "ood" / "ood.json").read_text())
    assert [r["layer"] for r in ood["table"]] == [1, 2]
    assert OODDetector.load(run / "ood" / "detector").layer == ood["best_layer"]

    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    for section in ("config", "metrics", "reward-kl", "best_of_n", "elo", "ood", "not-run"):
        assert f'id="{section}"' in page


def test_constant_layer_gives_chance_auroc():
    # Layer 0 at the last prompt token: the same ":" embedding for every prompt.
    h = np.ones((20, 3))
    r = evaluate_layer(h[:12], h[12:], num_fit=6, shots=[])
    assert r == {"auroc_relative_mahalanobis": 0.5, "auroc_mahalanobis": 0.5}
