"""`hh-ray report RUN_DIR`: one self-contained HTML page for a run folder.

The page reads only files (config.yaml, metrics.jsonl and the evaluation
folders), so it can be rebuilt at any time and for any run. Plots are PNGs
embedded as base64, so the page is a single file that can be mailed or
attached to an issue.

The page reads top-down, results first: headline numbers (held-out PM reward
before and after PPO, PM accuracy and ECE, the reward-vs-√KL fit), reward vs
√KL, best-of-n against RL, PM calibration, a few logged samples
(samples.jsonl), the other evaluations; then the training curves; the config
last, collapsed. A metric that is constant through a stage, or logged once
(`lr`, `epoch`, `train_pairs`), is listed with its value, never plotted.

Evaluation folders it looks for, each written by its `hh-ray eval …`:
  pm_eval/     PM accuracy and calibration (pm_eval.json + PNGs; train-pm writes it too)
  best_of_n/   best-of-n reward against KL, both the paper's log n and the exact form (best_of_n.json + PNG)
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
from hh_ray.tracking import parse_jsonl_rows, read_metrics

# Evaluation folders in page order. The first group are results the page leads with
# (best-of-n beside RL, PM calibration); the rest follow the logged samples.
LEAD_EVALUATIONS = {
    "best_of_n": "Best-of-n (rejection sampling) vs RL",
    "pm_eval": "Preference model: accuracy and calibration",
}
MORE_EVALUATIONS = {
    "elo": "Elo ratings",
    "robustness": "Robustness: train-PM vs test-PM",
    "ood": "OOD detection of harmful requests",
}
EVALUATIONS = {**LEAD_EVALUATIONS, **MORE_EVALUATIONS}
# Not measurements but positions (the x axis itself, or a count along it: against the
# step they draw a diagonal) or wall-clock; left out of the metric plots.
NOT_CURVES = {"step", "time", "global_step", "stage_step"}
SAMPLES_PER_END = 2   # logged rollouts shown from the first and from the last PPO iteration
SAMPLE_CHARS = 400    # longer prompts and responses are cut, keeping the end of a prompt

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; } th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
td.text { text-align: left; white-space: pre-wrap; max-width: 420px; font-size: 0.85em; }
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


def png_tag(path: Path, alt: str = "", data: dict | None = None) -> str:
    """An embedded PNG; `data` becomes data-* attributes (what a plot shows, for readers and tests)."""
    attrs = "".join(f' data-{k}="{html.escape(str(v))}"' for k, v in (data or {}).items())
    b64 = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt or Path(path).stem)}"{attrs} src="data:image/png;base64,{b64}">'


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


# ---------------------------------------------------------------- which series are curves (pure)

def is_curve(values: list[float]) -> bool:
    """A series worth a plot: at least two points and not all equal (a constant or one dot
    tells nothing a number would not)."""
    return len(values) >= 2 and len(set(values)) >= 2


def stage_series(rows: list[dict]) -> tuple[dict[str, list[tuple]], dict[str, object]]:
    """(curves, constants) of one stage's rows: every numeric metric as (step, value) points,
    those that vary as curves, the others (constant, or logged once) as their one value."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in NOT_CURVES | {"stage"}]
    curves, constants = {}, {}
    for k in keys:
        pts = [(r.get("step", i), r[k]) for i, r in enumerate(rows) if _is_number(r.get(k))]
        if not pts:
            continue
        if is_curve([v for _, v in pts]):
            curves[k] = pts
        else:
            constants[k] = pts[-1][1]
    return curves, constants


def reward_kl_points(rows: list[dict]) -> list[dict]:
    """The PPO iterations that logged both KL and PM reward (a resumed step counts once, as its last run)."""
    last = {r.get("step"): r for r in rows
            if r.get("stage") == "ppo" and _is_number(r.get("kl")) and _is_number(r.get("reward_pm"))}
    return list(last.values())


def reward_kl_fit(ppo: list[dict]) -> dict | None:
    """The paper's relation, reward = a + b·√KL, fitted over the PPO iterations; None below two."""
    if len(ppo) < 2:
        return None
    a, b, r2 = fit_linear([math.sqrt(max(0.0, r["kl"])) for r in ppo], [r["reward_pm"] for r in ppo])
    return {"intercept": a, "slope": b, "r2": r2, "iterations": len(ppo), "max_kl": max(r["kl"] for r in ppo)}


def _last(rows: list[dict], stage: str) -> dict:
    found = [r for r in rows if r.get("stage") == stage]
    return found[-1] if found else {}


def headline_numbers(rows: list[dict], pm_eval: dict | None) -> list[dict]:
    """The run's results in one table, each row {"result", "value", "from"}, for whatever the run has:
    held-out PM reward before and after PPO, PM held-out accuracy and ECE, the √KL fit."""
    out = []
    # train-ppo scores the held-out prompts at step 0 (π₀) and after its last iteration.
    held = {r.get("step"): r["reward_pm_heldout"] for r in rows
            if r.get("stage") == "ppo_eval" and _is_number(r.get("reward_pm_heldout"))}
    last = max((s for s in held if _is_number(s) and s > 0), default=None)
    if 0 in held:
        out.append({"result": "held-out PM reward, before PPO (π₀)", "value": held[0], "from": "ppo_eval, step 0"})
    if last is not None:
        out.append({"result": "held-out PM reward, after PPO", "value": held[last], "from": f"ppo_eval, step {last}"})
    if 0 in held and last is not None:
        out.append({"result": "held-out PM reward, gain", "value": held[last] - held[0], "from": "after − before"})
    # pm_eval/pm_eval.json when the folder is there (it has n); else the row train-pm logged.
    pm, where = (pm_eval, "pm_eval/pm_eval.json") if pm_eval else (_last(rows, "pm_eval"), "metrics, stage pm_eval")
    n = f" ({pm['n']} held-out pairs)" if _is_number(pm.get("n")) else ""
    for key, label in (("accuracy", "PM held-out accuracy"), ("ece", "PM expected calibration error (ECE)")):
        if _is_number(pm.get(key)):
            out.append({"result": label, "value": pm[key], "from": where + n})
    fit = reward_kl_fit(reward_kl_points(rows))
    if fit:
        span = f"fit over {fit['iterations']} PPO iterations"
        out += [{"result": "reward vs √KL: slope b", "value": fit["slope"], "from": span},
                {"result": "reward vs √KL: intercept a", "value": fit["intercept"], "from": span},
                {"result": "reward vs √KL: R²", "value": fit["r2"], "from": span}]
    return out


def few_samples(samples: list[dict], per_end: int = SAMPLES_PER_END) -> list[dict]:
    """The first `per_end` logged rollouts of the first and of the last PPO iteration: what the policy
    wrote before and after training."""
    steps = list(dict.fromkeys(s.get("step") for s in samples))
    if not steps:
        return []
    pick = [s for s in samples if s.get("step") == steps[0]][:per_end]
    if len(steps) > 1:
        pick += [s for s in samples if s.get("step") == steps[-1]][:per_end]
    return pick


def _cut(text: str, keep_end: bool = False) -> str:
    text = str(text)
    if len(text) <= SAMPLE_CHARS:
        return text
    return "…" + text[-SAMPLE_CHARS:] if keep_end else text[:SAMPLE_CHARS] + "…"


# ---------------------------------------------------------------- sections

def plot_metric_curves(curves: dict[str, list[tuple]], stage: str, out: Path) -> Path | None:
    """Small multiples: every metric of one stage that varies, against its step."""
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(curves))
    nrows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.3 * nrows), squeeze=False)
    for ax, (k, pts) in zip(axes.flat, curves.items()):
        ax.plot(*zip(*pts), "-o" if len(pts) < 30 else "-", ms=2)
        ax.set_title(k, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.suptitle(f"stage: {stage}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def headline_section(rows: list[dict], run_dir: Path) -> str:
    head = '<h2 id="headline">Results</h2>'
    pm_json = run_dir / "pm_eval" / "pm_eval.json"
    try:
        pm_eval = json.loads(pm_json.read_text()) if pm_json.exists() else None
    except ValueError:
        pm_eval = None  # the PM section below says it is unreadable
    numbers = headline_numbers(rows, pm_eval if isinstance(pm_eval, dict) else None)
    if not numbers:
        return head + '<p class="missing">no results yet: no PPO evaluation, PM evaluation or PPO iterations</p>'
    return head + html_table(numbers, ["result", "value", "from"])


def reward_kl_section(rows: list[dict], tmp: Path) -> str:
    """The paper's reward-vs-√KL relation for this run: fit, R², plot (from two iterations on)."""
    ppo = reward_kl_points(rows)
    head = '<h2 id="reward-kl">Reward vs √KL</h2>'
    fit = reward_kl_fit(ppo)
    if fit is None:
        return head + (f'<p class="missing">{len(ppo)} PPO iteration(s) in metrics.jsonl: '
                       'a relation needs two or more</p>')
    parts = [head, f"<p>Fit over {fit['iterations']} PPO iterations: reward = a + b·√KL</p>"
             + html_table([{"intercept a": fit["intercept"], "slope b": fit["slope"], "R²": fit["r2"],
                            "max KL": fit["max_kl"]}])]
    png = plot_reward_vs_sqrt_kl(ppo, tmp / "reward_vs_sqrt_kl.png")
    if png:
        parts.append(png_tag(png, "reward vs sqrt KL", {"points": len(ppo)}))
    return "\n".join(parts)


def samples_section(run_dir: Path) -> str | None:
    """A few rollouts from samples.jsonl (first and last iteration), or None when the run logged none."""
    path = run_dir / "samples.jsonl"
    if not path.exists():
        return None
    picked = few_samples(parse_jsonl_rows(path))
    if not picked:
        return None
    cols = ["step", "policy_version", "reward", "kl", "finish_reason"]
    head = "".join(f"<th>{c}</th>" for c in cols) + "<th>prompt (its end)</th><th>response</th>"
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(s.get(c, ''))}</td>" for c in cols)
        + f'<td class="text">{html.escape(_cut(s.get("prompt", ""), keep_end=True))}</td>'
        + f'<td class="text">{html.escape(_cut(s.get("response", "")))}</td></tr>' for s in picked)
    return (f'<h2 id="samples">Samples</h2><p>Logged rollouts of the first and the last PPO iteration '
            f'(of {html.escape(path.name)}).</p><table><tr>{head}</tr>{body}</table>')


def curves_section(rows: list[dict], tmp: Path) -> str:
    """Per stage, one plot of the metrics that vary; the constants and one-off values as a line of text."""
    head = '<h2 id="metrics">Metric curves</h2>'
    if not rows:
        return head + '<p class="missing">no metrics.jsonl</p>'
    parts = [head]
    for stage in dict.fromkeys(r.get("stage", "?") for r in rows):
        curves, constants = stage_series([r for r in rows if r.get("stage") == stage])
        png = plot_metric_curves(curves, stage, tmp / f"curves_{stage}.png")
        if png:
            parts.append(png_tag(png, f"metrics of {stage}: {', '.join(curves)}",
                                 {"stage": stage, "metrics": " ".join(curves)}))
        if constants:
            parts.append(f'<p class="constants"><b>{html.escape(stage)}</b>, not plotted (one value): '
                         + ", ".join(f"{html.escape(k)} = {_fmt(v)}" for k, v in constants.items()) + "</p>")
    return "\n".join(parts)


def config_section(run_dir: Path) -> str:
    """The resolved config, last and collapsed: what the run was, once its results are read."""
    cfg = run_dir / "config.yaml"
    if not cfg.exists():
        return '<h2 id="config">Config</h2><p class="missing">no config.yaml</p>'
    return ('<h2 id="config">Config</h2><details><summary>config.yaml (click to show)</summary>'
            f"<pre>{html.escape(cfg.read_text())}</pre></details>")


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
    """Write RUN_DIR/report.html (or `out`) and return its path.

    Top-down, as a reader wants it: the results (headline numbers, reward vs √KL,
    best-of-n against RL, PM calibration, a few samples, the other evaluations), then
    the training curves that vary, then what was not run, and the config last, collapsed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    rows = read_metrics(run_dir)
    evals = {name: evaluation_section(run_dir, name, title) for name, title in EVALUATIONS.items()}
    missing = [name for name, s in evals.items() if s is None]
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        sections = [headline_section(rows, run_dir), reward_kl_section(rows, tmp),
                    *(evals[name] for name in LEAD_EVALUATIONS), samples_section(run_dir),
                    *(evals[name] for name in MORE_EVALUATIONS), curves_section(rows, tmp)]
    if missing:
        sections.append('<h2 id="not-run">Evaluations not run</h2><p class="missing">'
                        + ", ".join(missing) + " (run <code>hh-ray eval …</code> with this --run-dir)</p>")
    sections.append(config_section(run_dir))
    title = f"hh-ray report: {html.escape(run_dir.resolve().name)}"
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>"
            f"</head><body><h1>{title}</h1><p>Written {time.strftime('%Y-%m-%d %H:%M:%S')} from "
            f"<code>{html.escape(str(run_dir.resolve()))}</code>.</p>"
            + "\n".join(s for s in sections if s) + "</body></html>")
    out = Path(out) if out else run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
