"""`hh-ray report RUN_DIR`: one self-contained HTML page for a run folder.

The page reads only files (config.yaml, metrics.jsonl and the evaluation
folders), so it can be rebuilt at any time and for any run. Plots are PNGs
embedded as base64, so the page is a single file that can be mailed or
attached to an issue.

Evaluation folders it looks for, each written by its `hh-ray eval …`:
  pm_eval/     PM accuracy and calibration (pm_eval.json + PNGs)
  best_of_n/   best-of-n reward against analytic KL (best_of_n.json + PNG)
  elo/         Elo ratings of checkpoints (elo.json + PNG)
  ood/         OOD detection AUROC per layer (ood.json + PNG; detector/)
  robustness/  train-PM vs test-PM against √KL, where they part (robustness.json + PNG;
               its PMs, PPO run and data below it are not read)
Every JSON's top-level numbers become a table, and so does every top-level
list of flat records; every PNG in the folder is shown.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
import time
from pathlib import Path

from hh_ray.reward_kl import fit_linear, plot_reward_vs_sqrt_kl
from hh_ray.tracking import read_metrics

EVALUATIONS = {
    "pm_eval": "Preference model: accuracy and calibration",
    "best_of_n": "Best-of-n (rejection sampling) vs RL",
    "elo": "Elo ratings",
    "ood": "OOD detection of harmful requests",
    "robustness": "Robustness: train-PM vs test-PM",
}
# Curves that say nothing about learning; left out of the metric plots.
NOT_CURVES = {"step", "time"}

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; } th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.3em; }
.missing { color: #888; }
"""


# ---------------------------------------------------------------- small HTML pieces

def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return html.escape(str(v))


def html_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return ""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def png_tag(path: Path, alt: str = "") -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt or Path(path).stem)}" src="data:image/png;base64,{data}">'


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def json_tables(results: dict) -> str:
    """Top-level numbers as one key/value table, top-level lists of flat records as tables."""
    parts = []
    scalars = [{"metric": k, "value": v} for k, v in results.items() if _is_number(v) or isinstance(v, str)]
    if scalars:
        parts.append(html_table(scalars))
    for k, v in results.items():
        if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            flat = [{c: x for c, x in r.items() if _is_number(x) or isinstance(x, str) or x is None} for r in v]
            parts.append(f"<h4>{html.escape(k)}</h4>" + html_table(flat[:100]))
    return "\n".join(parts)


# ---------------------------------------------------------------- sections

def plot_metric_curves(rows: list[dict], stage: str, out: Path) -> Path | None:
    """Small multiples: every numeric metric of one stage against its step."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if k not in NOT_CURVES and any(_is_number(r.get(k)) for r in rows)]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.3 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r.get("step", i), r[k]) for i, r in enumerate(rows) if _is_number(r.get(k))]
        ax.plot(*zip(*pts), "-o" if len(pts) < 30 else "-", ms=2)
        ax.set_title(k, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"stage: {stage}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def config_section(run_dir: Path) -> str:
    cfg = run_dir / "config.yaml"
    body = f"<pre>{html.escape(cfg.read_text())}</pre>" if cfg.exists() else '<p class="missing">no config.yaml</p>'
    return f'<h2 id="config">Config</h2>{body}'


def curves_section(rows: list[dict], tmp: Path) -> str:
    if not rows:
        return '<h2 id="metrics">Metric curves</h2><p class="missing">no metrics.jsonl</p>'
    parts = ['<h2 id="metrics">Metric curves</h2>']
    for stage in dict.fromkeys(r.get("stage", "?") for r in rows):
        png = plot_metric_curves([r for r in rows if r.get("stage") == stage], stage, tmp / f"curves_{stage}.png")
        if png:
            parts.append(png_tag(png, f"metrics of {stage}"))
    return "\n".join(parts)


def reward_kl_section(rows: list[dict], tmp: Path) -> str:
    """The paper's reward-vs-√KL relation for this run: fit, R², plot; and the held-out PM rewards."""
    ppo = [r for r in rows if r.get("stage") == "ppo" and _is_number(r.get("kl")) and _is_number(r.get("reward_pm"))]
    head = '<h2 id="reward-kl">Reward vs √KL</h2>'
    if not ppo:
        return head + '<p class="missing">no PPO iterations in metrics.jsonl</p>'
    x = [math.sqrt(max(0.0, r["kl"])) for r in ppo]
    y = [r["reward_pm"] for r in ppo]
    parts = [head]
    if len(ppo) >= 2:
        a, b, r2 = fit_linear(x, y)
        parts.append(f"<p>Fit over {len(ppo)} PPO iterations: reward = a + b·√KL</p>"
                     + html_table([{"intercept a": a, "slope b": b, "R²": r2, "max KL": max(r["kl"] for r in ppo)}]))
    png = plot_reward_vs_sqrt_kl(ppo, tmp / "reward_vs_sqrt_kl.png")
    if png:
        parts.append(png_tag(png, "reward vs sqrt KL"))
    held = [r for r in rows if r.get("stage") == "ppo_eval"]
    if held:
        parts.append("<h3>Held-out prompts</h3>" + html_table(
            [{k: v for k, v in r.items() if k not in ("stage", "time")} for r in held]))
    return "\n".join(parts)


def evaluation_section(run_dir: Path, name: str, title: str) -> str | None:
    """The section of one evaluation folder, or None when that evaluation has no data."""
    folder = run_dir / name
    if not folder.is_dir():
        return None
    jsons = sorted(folder.glob("*.json"))
    pngs = sorted(folder.glob("*.png"))
    if not jsons and not pngs:
        return None
    parts = [f'<h2 id="{name}">{html.escape(title)}</h2>']
    for j in jsons:
        try:
            results = json.loads(j.read_text())
        except ValueError as e:
            parts.append(f'<p class="missing">{html.escape(j.name)}: unreadable ({html.escape(str(e))})</p>')
            continue
        if isinstance(results, dict):
            # "method" says how it was measured, "finding" what came out (robustness: where the curves part).
            for key, label in (("method", "Method"), ("finding", "Finding")):
                if results.get(key):
                    parts.append(f"<p><b>{label}.</b> {html.escape(str(results[key]))}</p>")
            parts.append(json_tables({k: v for k, v in results.items() if k not in ("method", "finding")}))
    parts += [png_tag(p) for p in pngs]
    return "\n".join(parts)


# ---------------------------------------------------------------- the page

def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN_DIR/report.html (or `out`) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    rows = read_metrics(run_dir)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        sections = [config_section(run_dir), curves_section(rows, tmp), reward_kl_section(rows, tmp)]
        missing = []
        for name, title in EVALUATIONS.items():
            s = evaluation_section(run_dir, name, title)
            if s is None:
                missing.append(name)
            else:
                sections.append(s)
    if missing:
        sections.append('<h2 id="not-run">Evaluations not run</h2><p class="missing">'
                        + ", ".join(missing) + " (run <code>hh-ray eval …</code> with this --run-dir)</p>")
    title = f"hh-ray report: {html.escape(run_dir.resolve().name)}"
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>"
            f"</head><body><h1>{title}</h1><p>Written {time.strftime('%Y-%m-%d %H:%M:%S')} from "
            f"<code>{html.escape(str(run_dir.resolve()))}</code>.</p>" + "\n".join(sections) + "</body></html>")
    out = Path(out) if out else run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
