"""The paper's findings at small scale, from real runs: writes docs/results/results.json, the figures
beside it and docs/results/report.html.

    .venv/bin/python experiments/run.py --hh-data ../shared/data/hh-rlhf/harmless-base

Each experiment is one or more `hh-ray` commands run in RUNS/ (default runs/experiments); a command
whose output is already there is not run again, and one cut short continues (--resume, or for
`eval robustness` by itself), so running this again after an interruption picks up where it stopped.
What each experiment is and why it is set up so is in experiments/README.md.

One PPO run serves four experiments: the robustness run (configs/robustness.yaml: PPO against the PM
trained on one half of the synthetic comparisons) gives reward vs √KL (train PM), the RL curve that
best-of-n is drawn against (same PM, same axes) and the policy rated in the Elo experiment, whose
judge is the other half's PM, never trained against.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hh_ray.reward_kl import fit_linear, plot_reward_vs_sqrt_kl  # noqa: E402
from hh_ray.robustness import divergence_point  # noqa: E402
from hh_ray.runtime import processor_name  # noqa: E402
from hh_ray.tracking import read_metrics  # noqa: E402

HH_RAY = [str(Path(sys.executable).parent / "hh-ray")]
ROBUSTNESS = "configs/robustness.yaml"
BEST_OF_N_PROMPTS = 32
MIN_MOVE = 0.1  # `hh-ray eval robustness --min-move`'s default


def run(cmd: list[str], done: Path, log: Path, resumable: Path | None = None) -> float:
    """Run one hh-ray command unless `done` exists; its output goes to `log`. A `resumable` run folder
    that an interrupted run left (its config.yaml written) is continued with --resume. Seconds taken,
    or the seconds recorded when it last ran."""
    stamp = log.with_suffix(".seconds")
    if done.exists():
        return float(stamp.read_text()) if stamp.exists() else 0.0
    if resumable is not None and (resumable / "config.yaml").exists():
        cmd = cmd + ["--resume"]
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(cmd)}   (log: {log})", flush=True)
    t = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"experiments: command failed (exit {rc}); the end of {log}:\n{log.read_text()[-3000:]}")
    seconds = time.time() - t
    stamp.write_text(f"{seconds:.1f}")
    return seconds


def load(path: Path) -> dict:
    return json.loads(path.read_text())


# ---------------------------------------------------------------- the experiments

def pm_real(runs: Path, hh_data: Path) -> dict:
    """A SmolLM2 PM trained on 80% of the real harmless-base pairs, tested on the other 20%."""
    out = runs / "pm_real"
    cmd = HH_RAY + ["train-pm", "--config", "configs/demo.yaml", "--run-dir", str(out),
                    "--data.source", str(hh_data / "test.jsonl.gz"), "--data.skip_bad", "true",
                    "--data.eval_fraction", "0.2", "--model.max_seq_len", "256", "--pm.epochs", "1"]
    seconds = run(cmd, out / "pm_eval" / "pm_eval.json", runs / "logs" / "pm_real.log", resumable=out)
    ev = load(out / "pm_eval" / "pm_eval.json")
    data = read_metrics(out, "pm_data")[-1]
    return {"commands": [shlex.join(cmd)], "seconds": seconds,
            "train_pairs": data["train_pairs"], "truncated_transcripts": data["truncated_transcripts"],
            "skipped_bad_pairs": data.get("skipped_skipped", 0),
            "heldout_pairs": ev["n"], "heldout_accuracy": ev["accuracy"], "ece": ev["ece"],
            "heldout_loss": ev["loss"],
            "accuracy_by_turns": ev["accuracy_by_turns"],
            "figures": {"reliability": str(out / "pm_eval" / "reliability.png")}}


def robustness(runs: Path) -> dict:
    out = runs / "robustness"
    cmd = HH_RAY + ["eval", "robustness", "--config", ROBUSTNESS, "--run-dir", str(out)]
    seconds = run(cmd, out / "robustness" / "robustness.json", runs / "logs" / "robustness.log")
    res = load(out / "robustness" / "robustness.json")
    keep = ("gap_threshold", "train_pm_comparisons", "test_pm_comparisons", "train_pm_heldout_accuracy",
            "test_pm_heldout_accuracy", "method")
    table = res["table"]
    curves = [{k: r[k] for k in ("iteration", "sqrt_kl", "gain_train_pm", "gain_test_pm", "gap")} for r in table]
    # The divergence by the command's rule, applied to its table (a run made before the rule's min_move
    # existed gets the same answer as one made now).
    k, why = divergence_point([r["reward_train_pm"] for r in table], [r["reward_test_pm"] for r in table],
                              res["gap_threshold"], res.get("min_move", MIN_MOVE))
    return {"commands": [shlex.join(cmd)], "seconds": seconds, **{k_: res.get(k_) for k_ in keep},
            "min_move": res.get("min_move", MIN_MOVE),
            "divergence_iteration": table[k]["iteration"] if k is not None else "none",
            "divergence_sqrt_kl": table[k]["sqrt_kl"] if k is not None else "none", "finding": why,
            "curves": curves, "figures": {"robustness": str(out / "robustness" / "robustness.png")},
            "_train_pm": res["train_pm"], "_test_pm": res["test_pm"], "_ppo": res["ppo_run"]}


def reward_vs_sqrt_kl(rob: dict) -> dict:
    """The fit reward = a + b·√KL over the robustness run's PPO iterations (train PM's reward)."""
    rows = [r for r in read_metrics(rob["_ppo"], "ppo", last_per_step=True) if r.get("kl") is not None]
    x = [max(0.0, r["kl"]) ** 0.5 for r in rows]
    y = [r["reward_pm"] for r in rows]
    a, b, r2 = fit_linear(x, y)
    figure = plot_reward_vs_sqrt_kl(rows, Path(rob["_ppo"]) / "reward_vs_sqrt_kl.png")
    return {"commands": rob["commands"], "seconds": 0.0, "run": rob["_ppo"],
            "iterations": len(rows), "slope": b, "intercept": a, "r2": r2,
            "sqrt_kl_final": x[-1], "reward_first": y[0], "reward_last": y[-1],
            "method": "PPO rollouts' mean PM reward (the train PM of the robustness run) against √KL(π‖π₀) "
                      "measured on the same rollouts, one point per iteration; least squares a + b·√KL.",
            "figures": {"reward_vs_sqrt_kl": str(figure)}}


def best_of_n(runs: Path, rob: dict) -> dict:
    ppo = Path(rob["_ppo"])
    cmd = HH_RAY + ["eval", "best-of-n", "--config", ROBUSTNESS, "--run-dir", str(ppo), "--pm", rob["_train_pm"],
                    "--n-max", "16", "--num-prompts", str(BEST_OF_N_PROMPTS)]
    seconds = run(cmd, ppo / "best_of_n" / "best_of_n.json", runs / "logs" / "best_of_n.log")
    res = load(ppo / "best_of_n" / "best_of_n.json")
    rl = read_metrics(ppo, "ppo", last_per_step=True)
    return {"commands": [shlex.join(cmd)], "seconds": seconds, "method": res["method"],
            "num_prompts": res["num_prompts"],
            "n": [r["n"] for r in res["table"]], "reward": [r["reward_pm"] for r in res["table"]],
            "kl_log_n": [r["kl_log_n"] for r in res["table"]], "kl_exact": [r["kl_exact"] for r in res["table"]],
            "rl": {"sqrt_kl": [max(0.0, r["kl"]) ** 0.5 for r in rl], "reward": [r["reward_pm"] for r in rl]},
            "figures": {"best_of_n": str(ppo / "best_of_n" / "best_of_n.png")}}


def elo(runs: Path, rob: dict) -> dict:
    ppo = Path(rob["_ppo"])
    cmd = HH_RAY + ["eval", "elo", "--config", ROBUSTNESS, "--run-dir", str(ppo), "--pm", rob["_test_pm"],
                    "--policies", "smollm2", str(ppo / "policy"), "--best-of", "16", "--best-of-pm", rob["_train_pm"],
                    "--num-prompts", "64"]
    seconds = run(cmd, ppo / "elo" / "elo.json", runs / "logs" / "elo.log")
    res = load(ppo / "elo" / "elo.json")
    return {"commands": [shlex.join(cmd)], "seconds": seconds, "method": res["method"],
            "num_prompts": res["num_prompts"], "ties_dropped": res["ties_dropped"],
            "table": res["table"], "figures": {"elo": str(ppo / "elo" / "elo.png")}}


def online(runs: Path, rob: dict, rounds: int = 2) -> dict:
    """Online rounds labelled by a PM that is not the trained one (the robustness run's test PM, as a
    gold judge): the previous round's PM on the new round's comparisons against the new PM."""
    out = runs / "online"
    cmd = HH_RAY + ["online", "--config", "configs/demo.yaml", "--run-dir", str(out), "--online.rounds", str(rounds),
                    "--online.comparisons_per_round", "64", "--online.labeler", f"pm:{rob['_test_pm']}",
                    "--online.ppo_iterations", "8"]
    seconds = run(cmd, out / f"round-{rounds - 1}" / "summary.json", runs / "logs" / "online.log", resumable=out)
    rows = [load(out / f"round-{k}" / "summary.json") for k in range(rounds)]
    return {"commands": [shlex.join(cmd)], "seconds": seconds, "rounds": rounds,
            "previous_pm_accuracy_on_new": [r.get("pm_accuracy_fresh_before") for r in rows],
            "new_pm_accuracy": [r.get("pm_accuracy_fresh_after") for r in rows],
            "pm_train_pairs": [r.get("pm_train_pairs") for r in rows],
            "method": "configs/demo.yaml (SmolLM2, the synthetic comparisons as base data); each round: the "
                      "deployed snapshots' samples paired and labelled by the gold PM (the robustness run's "
                      "test PM, never trained against), the PM retrained from scratch on all data, PPO from π₀ "
                      "against it. previous_pm_accuracy_on_new: the previous round's PM on this round's fresh "
                      "comparisons (held out from it); new_pm_accuracy: this round's PM on them (trained on "
                      "them, so in-sample)."}


# ---------------------------------------------------------------- results.json, figures, report

def publish(results: dict, out: Path) -> None:
    """Copy every figure into `out`, point results.json at the copies, and write report.html."""
    out.mkdir(parents=True, exist_ok=True)
    for name, exp in results["experiments"].items():
        for k in [k for k in exp if k.startswith("_")]:
            exp.pop(k)
        for fig, src in list(exp.get("figures", {}).items()):
            if Path(src).exists():
                shutil.copy(src, out / f"{name}-{fig}.png")
                exp["figures"][fig] = f"{name}-{fig}.png"
            else:
                exp["figures"].pop(fig)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.html").write_text(report_html(results))


def report_html(results: dict) -> str:
    import html

    parts = [f"<h1>hh-ray: the paper's findings at small scale</h1><p>commit {results['commit']}, "
             f"{html.escape(results['processor'])}; <code>{html.escape(results['command'])}</code></p>"]
    for name, exp in results["experiments"].items():
        nums = {k: v for k, v in exp.items() if isinstance(v, (int, float, str)) and k not in ("method",)}
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in nums.items())
        figs = "".join(f'<img src="{f}" style="max-width:48%">' for f in exp.get("figures", {}).values())
        parts.append(f'<h2 id="{name}">{name}</h2><p>{html.escape(exp.get("method", ""))}</p>'
                     f"<table>{rows}</table>{figs}")
    return ("<!doctype html><meta charset=utf-8><title>hh-ray results</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td{padding:2px 8px}</style>"
            + "".join(parts))


def screenshot_report(run_dir: Path, png: Path) -> None:
    """`hh-ray report` of the PPO run (its evaluations included), rendered in headless Chromium."""
    subprocess.run(HH_RAY + ["report", str(run_dir)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox cannot start as root inside a container.
        browser = p.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                                    headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto((run_dir / "report.html").resolve().as_uri(), wait_until="load")
            page.screenshot(path=str(png), full_page=True)
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hh-data", default=os.environ.get("HH_DATA_DIR", ""),
                   help="folder with the real harmless-base test.jsonl.gz (default $HH_DATA_DIR)")
    p.add_argument("--runs", default="runs/experiments", help="where the runs go")
    p.add_argument("--out", default="docs/results", help="where results.json, figures and report.html go")
    args = p.parse_args(argv)
    if not args.hh_data or not (Path(args.hh_data) / "test.jsonl.gz").exists():
        p.error("--hh-data: a folder with harmless-base's test.jsonl.gz is needed (the real-data PM)")
    runs = Path(args.runs)
    exps: dict[str, dict] = {}
    exps["pm_real"] = pm_real(runs, Path(args.hh_data))
    rob = exps["robustness"] = robustness(runs)
    exps["reward_vs_sqrt_kl"] = reward_vs_sqrt_kl(rob)
    exps["best_of_n"] = best_of_n(runs, rob)
    exps["elo"] = elo(runs, rob)
    exps["online"] = online(runs, rob)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    command = ["python", "experiments/run.py", "--hh-data", args.hh_data, "--runs", args.runs, "--out", args.out]
    results = {"command": shlex.join(command),
               "commit": commit, "processor": processor_name(), "experiments": exps}
    ppo_run = Path(rob["_ppo"])
    publish(results, Path(args.out))
    screenshot_report(ppo_run, ROOT / "docs" / "report.png")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if isinstance(vv, (int, float))}
                      for k, v in exps.items()}, indent=1))
    print(f"wrote {args.out}/results.json and {args.out}/report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
