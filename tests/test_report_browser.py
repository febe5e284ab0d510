"""The report page in a real browser: headless Chromium (Debian's, driven by Playwright) loads
RUN_DIR/report.html, every section with data has its heading, every plot decodes, and a
screenshot is saved.

The run folder is built cheaply but honestly: metrics.jsonl rows shaped as train-pm and
train-ppo log them, and every evaluation folder written by the evaluation's own functions
(pm_metrics/save_report, best_of_n_curve/plot_best_of_n, fit_elo/plot_elo,
evaluate_layer/plot_ood, robustness_table/plot_robustness) on synthetic scores, so no model
runs here. Set HH_RAY_DOCS_SCREENSHOT=1 to also copy the screenshot to docs/report.png.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, tiny_config

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Section ids of write_report and the headings it gives them, for a run with every evaluation.
SECTIONS = {"config": "Config", "metrics": "Metric curves", "reward-kl": "Reward vs √KL",
            "pm_eval": "Preference model", "best_of_n": "Best-of-n", "elo": "Elo ratings",
            "ood": "OOD detection", "robustness": "Robustness"}


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
    rows = [{"stage": "pm", "step": s, "loss": 0.69 * 0.97 ** s, "accuracy": min(0.99, 0.5 + 0.02 * s)}
            for s in range(1, 30)]
    ppo = [{"stage": "ppo", "step": s, "kl": 0.02 * s * s, "sqrt_kl": 0.1414 * s,
            "reward_pm": 0.2 + 0.8 * 0.1414 * s + rng.normal(0, 0.02), "policy_loss": -0.01 * s,
            "value_loss": 0.1 / s, "entropy": 2.0 - 0.05 * s, "response_length": 40 + s} for s in range(1, 9)]
    rows += ppo + [{"stage": "ppo_eval", "step": 0, "reward_pm_heldout": 0.2},
                   {"stage": "ppo_eval", "step": 8, "reward_pm_heldout": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    # PM evaluation: scores of 200 pairs where chosen is ahead by ~1 on average.
    r_c = torch.tensor(rng.normal(1.0, 1.0, 200))
    r_r = torch.tensor(rng.normal(0.0, 1.0, 200))
    save_report(pm_metrics(r_c, r_r, [1 + i % 3 for i in range(200)]), r_c, r_r, run / "pm_eval")

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


def test_report_renders_in_chromium(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (`make test` installs Debian's)")
    from playwright.sync_api import sync_playwright

    from hh_ray.report import write_report

    page_file = write_report(build_run_folder(tmp_path / "run"))
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
            ids = dict(headings)
            for sid, text in SECTIONS.items():
                assert sid in ids and ids[sid].startswith(text), (sid, headings)
            assert "not-run" not in ids  # every evaluation has data here
            imgs = page.eval_on_selector_all(
                "img", "is => is.map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}))")
            # curves of pm, ppo, ppo_eval + reward vs √KL + 2 PM + best-of-n + elo + ood + robustness
            assert len(imgs) == 10, imgs
            assert all(i["ok"] for i in imgs), [i for i in imgs if not i["ok"]]
            # The robustness section carries its finding and its plot.
            rob = page.inner_text("body").split("Robustness: train-PM vs test-PM")[1]
            assert "Finding." in rob and "fell" in rob
            assert not errors, errors
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    if os.environ.get("HH_RAY_DOCS_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "report.png")
