"""The report page in a real browser: headless Chromium (Debian's, driven by Playwright) loads
RUN_DIR/report.html, every section with data has its heading, in the order a reader wants
(results first, curves next, the config last and collapsed), no plot is of a constant or of
a single point, every plot decodes, and a screenshot is saved.

The run folder is built cheaply but honestly: metrics.jsonl rows shaped as train-pm and
train-ppo log them, and every evaluation folder written by the evaluation's own functions
(pm_metrics/save_report, best_of_n_curve/plot_best_of_n, fit_elo/plot_elo,
evaluate_layer/plot_ood, robustness_table/plot_robustness) on synthetic scores, so no model
runs here, and nothing here is shown to users: docs/report.png is a real run's report
(experiments/run.py takes it).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_config

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Section ids of write_report and the headings it gives them, in page order, for a run with
# every evaluation: results first (headline numbers, reward vs √KL, best-of-n against RL, PM
# calibration, samples, the other evaluations), then the curves, the config last.
SECTIONS = {"headline": "Results", "reward-kl": "Reward vs √KL", "best_of_n": "Best-of-n",
            "pm_eval": "Preference model", "samples": "Samples", "elo": "Elo ratings",
            "robustness": "Robustness", "ood": "OOD detection", "metrics": "Metric curves", "config": "Config"}
# Metrics the run logs that are constant through their stage or logged once: never plotted.
NOT_PLOTTED = {"epoch", "lr", "batch_pairs", "train_pairs", "held_out_pairs", "ece", "staleness"}


def build_run_folder(run: Path) -> Path:
    import torch

    from hh_ray.best_of_n import best_of_n_curve, plot_best_of_n
    from hh_ray.config import save_config
    from hh_ray.elo import fit_elo, win_probability
    from hh_ray.orchestration.eval_commands import _save, plot_elo, plot_ood
    from hh_ray.ood_eval import evaluate_layer
    from hh_ray.pm_eval import pm_metrics, save_report
    from hh_ray.robustness import divergence_point, plot_robustness, robustness_table

    rng = np.random.default_rng(0)
    run.mkdir(parents=True)
    save_config(tiny_config(), run / "config.yaml")
    # As train-pm logs them: the data plan once, every step (with its constants), the held-out evaluation once.
    rows = [{"stage": "pm_data", "step": 0, "train_pairs": 1800, "held_out_pairs": 200, "truncated_transcripts": 3}]
    rows += [{"stage": "pm_finetune", "step": s, "global_step": s, "epoch": 0, "stage_step": s,
              "loss": 0.69 * 0.97 ** s, "accuracy": min(0.99, 0.5 + 0.02 * s), "lr": 1e-5, "batch_pairs": 16,
              "examples_seen": 16 * s, "examples_per_s": 20 + rng.normal(0, 1), "seen_digest": f"d{s}"}
             for s in range(1, 30)]
    # PM evaluation: scores of 200 pairs where chosen is ahead by ~1 on average (in metrics.jsonl and pm_eval/).
    r_c = torch.tensor(rng.normal(1.0, 1.0, 200))
    r_r = torch.tensor(rng.normal(0.0, 1.0, 200))
    pm = pm_metrics(r_c, r_r, [1 + i % 3 for i in range(200)])
    save_report(pm, r_c, r_r, run / "pm_eval")
    rows += [{"stage": "pm_eval", "step": 29, "n": pm["n"], "accuracy": pm["accuracy"], "ece": pm["ece"]}]
    ppo = [{"stage": "ppo", "step": s, "kl": 0.02 * s * s, "sqrt_kl": 0.1414 * s,
            "reward_pm": 0.2 + 0.8 * 0.1414 * s + rng.normal(0, 0.02), "policy_loss": -0.01 * s,
            "value_loss": 0.1 / s, "entropy": 2.0 - 0.05 * s, "response_length": 40 + s, "staleness": 0}
           for s in range(1, 9)]
    rows += ppo + [{"stage": "ppo_eval", "step": 0, "reward_pm_heldout": 0.2},
                   {"stage": "ppo_eval", "step": 8, "reward_pm_heldout": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = [{"step": s, "index": i, "prompt": f"\n\nHuman: question {s}.{i}?\n\nAssistant:",
                "response": f" answer {s}.{i} <b>not bold</b>", "finish_reason": "stop", "reward": 0.1 * s,
                "kl": 0.02 * s, "policy_version": s - 1} for s in range(1, 9) for i in range(4)]
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))

    curve = best_of_n_curve(rng.normal(0, 1, (16, 16)))
    folder = _save(run, "best_of_n", {"method": "synthetic scores", "table": curve})
    plot_best_of_n(curve, ppo, folder / "best_of_n.png")

    true = np.array([-100.0, 0.0, 100.0])
    elo = fit_elo(200 * win_probability(true[:, None] - true[None, :]) * (1 - np.eye(3)))
    table = [{"model": m, "elo": float(e)} for m, e in zip(["init", "iter-4", "iter-8"], elo)]
    folder = _save(run, "elo", {"method": "PM as judge", "table": table})
    plot_elo(table, folder / "elo.png")

    ood = [{"layer": layer, **evaluate_layer(rng.normal(0, 1, (60, 4)), rng.normal(0, 1, (30, 4)) + [0.5 * layer, 0, 0, 0],
                                             num_fit=30, shots=[4])} for layer in (1, 2, 3)]
    folder = _save(run, "ood", {"method": "synthetic activations", "table": ood})
    plot_ood(ood, folder / "ood_auroc_by_layer.png")

    train_r, test_r = [0.0, 0.4, 0.8, 1.2, 1.6], [0.0, 0.35, 0.6, 0.55, 0.3]
    table = robustness_table([0, 2, 4, 6, 8], [0.0, 0.08, 0.32, 0.72, 1.28], train_r, test_r)
    k, why = divergence_point(train_r, test_r, 0.5)
    folder = _save(run, "robustness", {"method": "synthetic curves", "finding": why, "table": table})
    plot_robustness(table, k, folder / "robustness.png")
    return run


def _series(run: Path, stage: str, metric: str) -> list[float]:
    """What the test wrote to metrics.jsonl for one metric of one stage (not what the page says)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[metric] for r in rows if r["stage"] == stage and isinstance(r.get(metric), (int, float))]


def check_results_lead(page, run: Path) -> None:
    """The first screen is results: the headline table, with the numbers of this run."""
    table = page.locator("#headline + table")
    assert table.bounding_box()["y"] < 900  # in the first viewport, above every plot
    text = table.inner_text()
    for what in ("before PPO", "after PPO", "PM held-out accuracy", "ECE", "slope", "R²"):
        assert what in text, (what, text)
    pm = json.loads((run / "pm_eval" / "pm_eval.json").read_text())
    for value in (0.2, 1.0, pm["accuracy"], pm["ece"]):  # before, after, accuracy, ECE as written
        assert f"\t{value:.4g}\t" in text, (value, text)
    first_plot = page.locator("img").first.bounding_box()["y"]
    assert table.bounding_box()["y"] < first_plot
    # Samples from the first and the last PPO iteration, as text (escaped), not as markup.
    samples = page.locator("#samples ~ table").first.inner_text()
    assert "answer 1.0" in samples and "answer 8.1" in samples and "answer 4.0" not in samples
    assert "<b>not bold</b>" in samples


def check_config_last_and_collapsed(page) -> None:
    details = page.locator("#config + details")
    assert details.count() == 1 and details.get_attribute("open") is None
    assert not page.locator("#config + details pre").is_visible()
    assert "seed: 0" in page.locator("#config + details pre").text_content()  # there, one click away
    # nothing follows the config section but its own details
    assert page.evaluate("() => document.querySelector('#config + details').nextElementSibling") is None


def check_no_plot_of_a_constant_or_a_point(page, run: Path) -> None:
    """Every metric a curve plot names has at least two points that are not all equal, in the data
    the test wrote; the constants and one-off values are listed with their values instead."""
    plots = page.eval_on_selector_all("img[data-metrics]", "is => is.map(i => [i.dataset.stage, i.dataset.metrics])")
    assert {stage for stage, _ in plots} == {"pm_finetune", "ppo", "ppo_eval"}, plots
    plotted = set()
    for stage, metrics in plots:
        for m in metrics.split():
            values = _series(run, stage, m)
            assert len(values) >= 2 and len(set(values)) >= 2, (stage, m, values)
            plotted.add(m)
    assert {"loss", "accuracy", "kl", "reward_pm", "reward_pm_heldout"} <= plotted
    assert not plotted & (NOT_PLOTTED | {"stage_step", "global_step"}), plotted & NOT_PLOTTED
    listed = page.locator("p.constants").all_inner_texts()
    for text in ("lr = 1e-05", "epoch = 0", "batch_pairs = 16", "train_pairs = 1800", "staleness = 0"):
        assert any(text in line for line in listed), (text, listed)
    # the reward-vs-√KL plot is of every PPO iteration, never of one
    assert int(page.get_attribute("#reward-kl ~ img[data-points]", "data-points")) == 8


def test_report_renders_in_chromium(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (`make test` installs Debian's)")
    from playwright.sync_api import sync_playwright

    from hh_ray.report import write_report

    run = build_run_folder(tmp_path / "run")
    page_file = write_report(run)
    shot = tmp_path / "report.png"
    with sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox cannot start as root inside a container.
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            response = page.goto(page_file.as_uri(), wait_until="load")
            assert response is None or response.ok  # file:// gives no HTTP response on some versions
            assert page.title().startswith("hh-ray report")
            headings = page.eval_on_selector_all("h2", "hs => hs.map(h => [h.id, h.textContent])")
            # Every section, in the reader's order: results, then curves, the config last.
            assert [h for h, _ in headings] == list(SECTIONS), headings
            for (sid, text), (_, shown) in zip(SECTIONS.items(), headings):
                assert shown.startswith(text), (sid, shown)
            check_results_lead(page, run)
            check_config_last_and_collapsed(page)
            imgs = page.eval_on_selector_all(
                "img", "is => is.map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}))")
            # reward vs √KL + best-of-n + 2 PM + elo + robustness + ood + curves of pm_finetune, ppo, ppo_eval
            # (pm_data and pm_eval logged one row each: listed, not plotted)
            assert len(imgs) == 10, imgs
            assert all(i["ok"] for i in imgs), [i for i in imgs if not i["ok"]]
            check_no_plot_of_a_constant_or_a_point(page, run)
            # The robustness section carries its finding and its plot.
            rob = page.inner_text("body").split("Robustness: train-PM vs test-PM")[1]
            assert "Finding." in rob and "fell" in rob
            assert not errors, errors
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
