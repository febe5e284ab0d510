"""Preference-model math and evaluation: loss, accuracy, calibration, reports.

No Ray here: the learner (learners/pm_learner.py) and `hh-ray eval pm` both
use these functions, and they are tested with hand-computed numbers.

The PM predicts P(chosen ≻ rejected) = σ(r_chosen − r_rejected) (Bai et al.
2022, §3 and App. A.2). Every human label says "chosen wins", so calibration is measured on
both orderings of each pair: (p, won) and (1 − p, lost). Without that
mirroring every bin's observed frequency would be 1 and the diagram would say
nothing.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from hh_ray.conversation import pm_format, render_transcript
from hh_ray.data import Comparison, DataError, load_comparisons, train_eval_split

NUM_BINS = 10


# ---------------------------------------------------------------- the math

def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """The paper's PM loss: −log σ(r_chosen − r_rejected), averaged over pairs."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def preference_probability(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """P(chosen ≻ rejected) under the Bradley–Terry model the loss fits."""
    return torch.sigmoid(r_chosen - r_rejected)


def accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs where the PM ranks chosen above rejected; a tie counts as a coin flip (½)."""
    diff = r_chosen - r_rejected
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


def accuracy_by_turns(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                      turns: list[int]) -> dict[int, dict]:
    """Accuracy per number of Human turns in the context: {turns: {"accuracy", "n"}}."""
    turns_t = torch.tensor(turns)
    out = {}
    for t in sorted(set(turns)):
        sel = turns_t == t
        out[t] = {"accuracy": accuracy(r_chosen[sel], r_rejected[sel]), "n": int(sel.sum())}
    return out


def reliability_bins(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                     num_bins: int = NUM_BINS) -> list[dict]:
    """Equal-width bins of predicted P(A ≻ B) over both orderings of every pair.

    Each bin: its edges, how many predictions fell in it, their mean predicted
    probability and the observed frequency of A actually being preferred.
    """
    p = preference_probability(r_chosen, r_rejected).double()
    probs = torch.cat([p, 1 - p])
    won = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    # p == 1.0 belongs to the last bin, not to a bin past the end.
    idx = torch.clamp((probs * num_bins).long(), max=num_bins - 1)
    bins = []
    for b in range(num_bins):
        sel = idx == b
        n = int(sel.sum())
        bins.append({"lo": b / num_bins, "hi": (b + 1) / num_bins, "n": n,
                     "mean_predicted": probs[sel].mean().item() if n else None,
                     "observed": won[sel].mean().item() if n else None})
    return bins


def expected_calibration_error(bins: list[dict]) -> float:
    """ECE = Σ_b (n_b / N) · |mean predicted_b − observed_b| over the reliability bins."""
    total = sum(b["n"] for b in bins)
    return sum(b["n"] / total * abs(b["mean_predicted"] - b["observed"]) for b in bins if b["n"])


def pm_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor, turns: list[int]) -> dict:
    """Everything `eval pm` reports, as plain JSON-able numbers."""
    bins = reliability_bins(r_chosen, r_rejected)
    return {
        "n": len(r_chosen),
        "loss": pairwise_loss(r_chosen, r_rejected).item(),
        "accuracy": accuracy(r_chosen, r_rejected),
        "ece": expected_calibration_error(bins),
        "accuracy_by_turns": accuracy_by_turns(r_chosen, r_rejected, turns),
        "reliability_bins": bins,
        "score_chosen_mean": r_chosen.mean().item(),
        "score_rejected_mean": r_rejected.mean().item(),
        "score_std": torch.cat([r_chosen, r_rejected]).std().item() if len(r_chosen) > 1 else 0.0,
    }


# ---------------------------------------------------------------- scoring

def comparison_groups(comparisons: list[Comparison], tok, fmt: str) -> list[list[str]]:
    """[chosen, rejected] transcript of each comparison, rendered in the PM's conversation format."""
    return [[render_transcript(c.prompt, c.chosen, tok, fmt), render_transcript(c.prompt, c.rejected, tok, fmt)]
            for c in comparisons]


def score_comparisons(model, tok, comparisons: list[Comparison], max_len: int, batch_size: int = 16,
                      fmt: str = "hh", mixed: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) for every comparison, the score read at the end-of-context token;
    the two transcripts of a comparison share their context in one packed row."""
    from hh_ray.models import pm_group_scores

    model.eval()
    scores = torch.tensor(pm_group_scores(model, tok, comparison_groups(comparisons, tok, fmt), max_len,
                                          batch_size, mixed)).reshape(-1, 2)
    return scores[:, 0], scores[:, 1]


# ---------------------------------------------------------------- which comparisons

def pm_comparisons(cfg, counter: dict | None = None) -> tuple[list[Comparison], list[Comparison]]:
    """(train, held-out) comparisons as the config defines them.

    The learner and `eval pm` share this, so "held-out" means the same pairs
    in both. Pairs whose chosen and rejected transcripts are identical carry
    no preference and are skipped; counter["identical"] says how many.
    """
    counter = counter if counter is not None else {}
    d = cfg.data
    load = dict(data_dir=d.data_dir, skip_bad=d.skip_bad, num_synthetic=d.num_synthetic,
                seed=cfg.seed, counter=counter, skip_identical=True)
    pairs = load_comparisons(d.source, split=d.split, **load)
    if d.max_examples:
        pairs = pairs[: d.max_examples]
    if d.eval_split:
        train, held_out = pairs, load_comparisons(d.source, split=d.eval_split, **load)
    else:
        train, held_out = train_eval_split(pairs, d.eval_fraction, seed=cfg.seed)
    if not train:
        raise DataError(f"{d.source}: no training comparisons left after holding out "
                        f"{len(held_out)} (data.eval_fraction={d.eval_fraction})")
    return train, held_out


# ---------------------------------------------------------------- reports

def format_table(results: dict) -> str:
    rows = [("pairs", f"{results['n']}"), ("accuracy", f"{results['accuracy']:.3f}"),
            ("loss", f"{results['loss']:.4f}"), ("ECE", f"{results['ece']:.4f}"),
            ("mean score chosen", f"{results['score_chosen_mean']:+.3f}"),
            ("mean score rejected", f"{results['score_rejected_mean']:+.3f}")]
    for t, v in sorted(results["accuracy_by_turns"].items(), key=lambda kv: int(kv[0])):
        rows.append((f"accuracy, {t} turn{'s' if int(t) != 1 else ''}", f"{v['accuracy']:.3f}  (n={v['n']})"))
    rows.append(("", ""))
    rows.append(("P(chosen>rejected) bin", "observed  (n)"))
    for b in results["reliability_bins"]:
        if b["n"]:
            rows.append((f"  {b['lo']:.1f}-{b['hi']:.1f}  mean {b['mean_predicted']:.3f}",
                         f"{b['observed']:.3f}  ({b['n']})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def plot_reliability(bins: list[dict], ece: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    filled = [b for b in bins if b["n"]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.bar([(b["lo"] + b["hi"]) / 2 for b in filled], [b["observed"] for b in filled],
           width=1 / len(bins), alpha=0.3, edgecolor="k", label="observed frequency")
    ax.plot([b["mean_predicted"] for b in filled], [b["observed"] for b in filled], "o-", label="PM")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(A ≻ B)", ylabel="frequency A preferred",
           title=f"PM calibration (ECE {ece:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scores(r_chosen: torch.Tensor, r_rejected: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.hist(r_chosen.numpy(), bins=40, alpha=0.6, label="chosen")
    a.hist(r_rejected.numpy(), bins=40, alpha=0.6, label="rejected")
    a.set(xlabel="PM score", ylabel="count", title="score distribution")
    a.legend()
    b.hist((r_chosen - r_rejected).numpy(), bins=40, color="tab:green")
    b.axvline(0, color="k", lw=0.8)
    b.set(xlabel="r_chosen − r_rejected", title="score difference")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_report(results: dict, r_chosen: torch.Tensor, r_rejected: torch.Tensor, out_dir: Path) -> Path:
    """pm_eval.json, reliability.png and scores.png in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pm_eval.json").write_text(json.dumps(results, indent=2))
    plot_reliability(results["reliability_bins"], results["ece"], out_dir / "reliability.png")
    plot_scores(r_chosen, r_rejected, out_dir / "scores.png")
    return out_dir


def evaluate_pm(model, tok, comparisons: list[Comparison], max_len: int, out_dir: Path,
                batch_size: int = 16, fmt: str = "hh") -> dict:
    """Score, compute the metrics, save the report; returns the metrics."""
    if not comparisons:
        raise DataError("no comparisons to evaluate on")
    r_c, r_r = score_comparisons(model, tok, comparisons, max_len, batch_size, fmt)
    results = pm_metrics(r_c, r_r, [c.num_turns for c in comparisons])
    save_report(results, r_c, r_r, out_dir)
    return results


def flat_summary(results: dict) -> dict:
    """The scalar metrics, with per-turn accuracy as accuracy_turns_<k>, for metrics.jsonl / W&B."""
    out = {k: v for k, v in results.items() if isinstance(v, (int, float))}
    out.update({f"accuracy_turns_{t}": v["accuracy"] for t, v in results["accuracy_by_turns"].items()})
    return out


def eval_pm_command(cfg, run_dir: Path, pm_dir: str | None, data: str | None) -> int:
    """`hh-ray eval pm`: score held-out comparisons with a trained PM, print and save the results.

    Without --data, the held-out part of the config's data (as train-pm split
    it); with --data, every comparison in that source.
    """
    from hh_ray.models import load_scalar_head_model
    from hh_ray.tracking import Tracker

    pm_dir = pm_dir or cfg.model.pm
    if not pm_dir or not (Path(pm_dir) / "config.json").exists():
        print(f"hh-ray eval pm: error: --pm must name a trained PM folder (got {pm_dir!r})", file=sys.stderr)
        return 2
    counter: dict = {}
    if data:
        comparisons = load_comparisons(data, data_dir=cfg.data.data_dir, split=cfg.data.split,
                                       skip_bad=cfg.data.skip_bad, num_synthetic=cfg.data.num_synthetic,
                                       seed=cfg.seed, counter=counter, skip_identical=True)
    else:
        _, comparisons = pm_comparisons(cfg, counter)
    if counter:
        print(f"skipped: {counter}")
    model, tok = load_scalar_head_model(pm_dir, cfg.model.dtype)
    results = evaluate_pm(model, tok, comparisons, cfg.model.max_seq_len, Path(run_dir) / "pm_eval",
                          fmt=pm_format(pm_dir))
    results["pm"] = str(pm_dir)
    results["skipped"] = counter
    (Path(run_dir) / "pm_eval" / "pm_eval.json").write_text(json.dumps(results, indent=2))
    tracker = Tracker(run_dir, cfg, stage="eval_pm")
    tracker.log(0, flat_summary(results))
    tracker.summary(flat_summary(results))
    tracker.close()
    print(format_table(results))
    print(f"saved to {Path(run_dir) / 'pm_eval'}")
    return 0 if math.isfinite(results["loss"]) else 1
