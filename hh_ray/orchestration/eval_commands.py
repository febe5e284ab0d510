"""`hh-ray eval best-of-n | elo | ood | robustness`: run an evaluation and save it in the run folder.

Each writes RUN_DIR/<name>/<name>.json (top-level numbers, a "method" line
and a "table" of rows) and PNGs next to it, which `hh-ray report RUN_DIR`
picks up. The math is in best_of_n.py, elo.py, ood.py / ood_eval.py and robustness.py.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np

from hh_ray.config import Config
from hh_ray.data import DataError, first_prompt, load_comparisons, prompts_of
from hh_ray.conversation import pm_format
from hh_ray.orchestration.robustness import eval_robustness
from hh_ray.orchestration.sampling import PolicySampler, sample_policies


def _save(run_dir: Path, name: str, results: dict) -> Path:
    folder = Path(run_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(results, indent=2))
    return folder


def _pm_dir(cfg: Config, run_dir: Path, pm: str | None) -> str:
    """--pm, else the config's PM, else the run's own pm/."""
    from hh_ray.models import is_scalar_head_model

    for cand in (pm, cfg.model.pm, str(Path(run_dir) / "pm")):
        if cand and is_scalar_head_model(cand):
            return cand
    raise FileNotFoundError(f"no trained PM: pass --pm (tried {pm!r}, model.pm={cfg.model.pm!r}, {run_dir}/pm)")


def eval_prompts(cfg: Config, num: int) -> list[str]:
    """Held-out prompts of the config's data (as train-pm and train-ppo split it)."""
    from hh_ray.pm_eval import pm_comparisons

    _, held_out = pm_comparisons(cfg)
    prompts = prompts_of(held_out)[:num]
    if not prompts:
        raise DataError("no held-out prompts")
    return prompts


# ---------------------------------------------------------------- best-of-n

def eval_best_of_n(cfg: Config, run_dir: Path, args) -> int:
    """Sample N responses per held-out prompt from the initial policy, score with the PM, and plot
    E[best of n] against √KL beside the run's PPO iterations, the KL given both ways
    (`kl_log_n`: the paper's log n; `kl_exact`: log n − (n−1)/n; see hh_ray.best_of_n)."""
    from hh_ray.best_of_n import best_of_n_curve, plot_best_of_n
    from hh_ray.models import load_scalar_head_model, resolve_model
    from hh_ray.sampling import score_samples
    from hh_ray.tracking import read_metrics

    policy = resolve_model(args.policy or cfg.model.policy, cfg.model.cache_dir)
    pm_dir = _pm_dir(cfg, run_dir, args.pm)
    prompts = eval_prompts(cfg, args.num_prompts)
    with PolicySampler(cfg, policy) as sampler:
        responses = sampler.sample(prompts, args.n_max)
    pm, pm_tok = load_scalar_head_model(pm_dir, cfg.model.dtype)
    scores = score_samples(pm, pm_tok, prompts, responses, cfg.model.max_seq_len, fmt=pm_format(pm_dir))
    curve = best_of_n_curve(scores)
    results = {"method": f"{args.n_max} samples per prompt from π₀ ({policy}), scored by the PM ({pm_dir}); "
                         "E[best of n] estimated exactly over all n-subsets; KL given two ways: kl_log_n = log n "
                         "(the paper's) and kl_exact = log n − (n−1)/n (the closed form).",
               "num_prompts": len(prompts), "samples_per_prompt": args.n_max, "table": curve}
    folder = _save(run_dir, "best_of_n", results)
    plot_best_of_n(curve, read_metrics(run_dir, "ppo"), folder / "best_of_n.png")
    for r in curve:
        print(f"n={r['n']:>3}  KL: log n={r['kl_log_n']:.3f} (paper), exact={r['kl_exact']:.3f}  "
              f"PM reward={r['reward_pm']:+.4f}")
    print(f"saved to {folder}")
    return 0


# ---------------------------------------------------------------- Elo

def plot_elo(table: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(table)), 3.5))
    x = np.arange(len(table))
    ax.bar(x - 0.2, [r["elo"] for r in table], 0.4, color="tab:blue", label="fitted (ties dropped)")
    if all("elo_174_pm" in r for r in table):
        ax.bar(x + 0.2, [r["elo_174_pm"] for r in table], 0.4, color="tab:orange", label="174 × ΔPM")
        ax.legend(fontsize=7)
    ax.set_xticks(x, [r["model"] for r in table])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("Elo (PM as judge, mean 0)")
    ax.tick_params(axis="x", labelsize=7, rotation=20)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def eval_elo(cfg: Config, run_dir: Path, args) -> int:
    """One response per held-out prompt from each policy (and, with --best-of N, the best of N samples
    of the first policy by the --best-of-pm); every pair plays each prompt, judged by --pm. Elo by
    maximum likelihood from the judge's wins, ties dropped as the paper drops them (`elo`), beside the
    fractional wins σ(r_a − r_b) (`elo_soft`) and the paper's rule of thumb ΔElo ≈ 174·ΔPM (`elo_174_pm`)."""
    from hh_ray.elo import ELO_PER_PM_UNIT, fit_elo, judged_wins, soft_wins, win_probability
    from hh_ray.models import load_scalar_head_model, resolve_model
    from hh_ray.sampling import score_samples

    policies = args.policies or [cfg.model.policy, str(Path(run_dir) / "policy")]
    if len(policies) + (args.best_of > 0) < 2:
        raise ValueError("eval elo: give at least two --policies, or one and --best-of N")
    paths = [resolve_model(p, cfg.model.cache_dir) for p in policies]
    pm_dir = _pm_dir(cfg, run_dir, args.pm)
    prompts = eval_prompts(cfg, args.num_prompts)

    @functools.cache
    def judge(pm_path: str):
        return load_scalar_head_model(pm_path, cfg.model.dtype)

    def scores_by(pm_path: str, responses: list[list[str]]) -> np.ndarray:
        pm, pm_tok = judge(pm_path)  # each PM loaded once, however many players it scores
        return score_samples(pm, pm_tok, prompts, responses, cfg.model.max_seq_len, fmt=pm_format(pm_path))

    names = [p if not Path(p).exists() else "/".join(Path(p).resolve().parts[-2:]) for p in policies]
    # Policies of one architecture share engines, each one's weights loaded in turn.
    responses = sample_policies(cfg, paths, prompts, [max(1, args.best_of)] + [1] * (len(paths) - 1))
    if args.best_of:
        # The first policy's own player is its first sample; best-of-N picks among all N by the PM the
        # policies were trained against, and the judge (--pm) rates the pick.
        chooser = args.best_of_pm or pm_dir
        pick = scores_by(chooser, responses[0]).argmax(1)
        responses.append([r[i:i + 1] for r, i in zip(responses[0], pick)])
        responses[0] = [r[:1] for r in responses[0]]
        names.append(f"best-of-{args.best_of} of {names[0]}")
    scores = np.stack([scores_by(pm_dir, r)[:, 0] for r in responses])
    wins, ties = judged_wins(scores)
    elo = fit_elo(wins)
    elo_soft = fit_elo(soft_wins(scores))
    means = scores.mean(1)
    table = [{"model": n, "elo": float(e), "elo_soft": float(es),
              "elo_174_pm": float(ELO_PER_PM_UNIT * (m - means.mean())), "mean_pm_score": float(m)}
             for n, e, es, m in zip(names, elo, elo_soft, means)]
    results = {"method": f"judge PM {pm_dir}: each pair of players answers the same {len(prompts)} held-out "
                         "prompts; a game is won by the higher judge score, ties dropped (as the paper drops "
                         "them); elo: maximum likelihood, win prob 1/(1+10^(−ΔElo/400)); elo_soft: the same "
                         "fit to fractional wins σ(r_a − r_b); elo_174_pm: 174 × (mean judge score − mean of "
                         "means), the paper's ΔElo ≈ 174 ΔPM."
                         + (f" best-of-{args.best_of}: the best of {args.best_of} samples of {names[0]} by "
                            f"{args.best_of_pm or pm_dir}." if args.best_of else ""),
               "num_prompts": len(prompts), "pm": pm_dir, "ties_dropped": ties, "table": table,
               "win_matrix": wins.tolist(),
               "predicted_vs_observed": [{"a": names[i], "b": names[j],
                                          "observed": wins[i, j] / max(1, wins[i, j] + wins[j, i]),
                                          "predicted": float(win_probability(elo[i] - elo[j]))}
                                         for i in range(len(names)) for j in range(i + 1, len(names))]}
    folder = _save(run_dir, "elo", results)
    plot_elo(table, folder / "elo.png")
    for r in table:
        print(f"{r['model']:<40} Elo {r['elo']:+7.1f} (soft {r['elo_soft']:+7.1f}, 174·ΔPM {r['elo_174_pm']:+7.1f})"
              f"   mean PM score {r['mean_pm_score']:+.4f}")
    print(f"{ties} tied games dropped; saved to {folder}")
    return 0


# ---------------------------------------------------------------- OOD detection

def first_turn_prompts(source: str, cfg: Config, num: int) -> list[str]:
    """The first human request of each distinct conversation: what a deployed detector sees first."""
    pairs = load_comparisons(source, data_dir=cfg.data.data_dir if source == cfg.data.source else "",
                             split=cfg.data.split, skip_bad=True, num_synthetic=cfg.data.num_synthetic,
                             seed=cfg.seed, skip_identical=True)
    return list(dict.fromkeys(first_prompt(p) for p in prompts_of(pairs)))[:num]


def plot_ood(table: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for key in [k for k in table[0] if k.startswith("auroc_")]:
        ax.plot([r["layer"] for r in table], [r[key] for r in table], "o-", ms=3, label=key[6:])
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="layer (hidden_states index)", ylabel="AUROC helpful vs harmful", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def eval_ood(cfg: Config, run_dir: Path, args) -> int:
    from hh_ray.models import load_policy, load_tokenizer, resolve_model
    from hh_ray.ood import OODDetector, last_prompt_token_activations
    from hh_ray.ood_eval import absolute_ridge, evaluate_layer

    model_path = resolve_model(args.policy or cfg.model.policy, cfg.model.cache_dir)
    helpful = first_turn_prompts(args.helpful, cfg, args.num_prompts)
    harmful = first_turn_prompts(args.harmful or cfg.data.source, cfg, args.num_prompts)
    if len(helpful) < 4 or len(harmful) < 2:
        raise DataError(f"eval ood: too few prompts (helpful {len(helpful)}, harmful {len(harmful)})")
    model, tok = load_policy(model_path, cfg.model.dtype), load_tokenizer(model_path)
    num_layers = model.config.num_hidden_layers
    # Not layer 0: the last prompt token is always the same ":", so its embedding says nothing.
    layers = args.layers or sorted({max(1, num_layers // 4), num_layers // 2, 3 * num_layers // 4, num_layers})
    num_fit = len(helpful) // 2
    shots = [k for k in (args.shots or [1, 4, 16]) if k < len(harmful)]
    table, acts = [], {}
    for layer in layers:
        h_in = last_prompt_token_activations(model, tok, helpful, layer, cfg.model.max_seq_len)
        h_out = last_prompt_token_activations(model, tok, harmful, layer, cfg.model.max_seq_len)
        acts[layer] = (h_in, h_out)
        table.append({"layer": layer, **evaluate_layer(h_in, h_out, num_fit, shots, args.ridge, cfg.seed)})
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in table[-1].items()), flush=True)
    best = max(table, key=lambda r: r["auroc_relative_mahalanobis"])
    h_in, _ = acts[best["layer"]]
    fit = h_in[:num_fit]
    det = OODDetector.fit(fit, best["layer"], ridge=absolute_ridge(fit, args.ridge))
    # Flag the top 5% of held-out helpful prompts: a false-alarm rate one can state.
    det.threshold = float(np.quantile(det.score(h_in[num_fit:]), 0.95))
    results = {"method": (f"Activations of {model_path} at hidden_states[layer], last prompt token; Gaussian fitted "
                          f"on {num_fit} helpful prompts ({args.helpful}, first human turn), AUROC on the other "
                          f"{len(helpful) - num_fit} helpful vs {len(harmful)} harmful prompts "
                          f"({args.harmful or cfg.data.source}, first human turn). Ridge {args.ridge} × mean unit "
                          "variance. k-shot probe: logistic regression on the fit set plus k harmful prompts, "
                          "tested on the rest."),
               "best_layer": best["layer"], "best_auroc_relative_mahalanobis": best["auroc_relative_mahalanobis"],
               "detector_threshold": det.threshold, "table": table}
    folder = _save(run_dir, "ood", results)
    det.save(folder / "detector")
    plot_ood(table, folder / "ood_auroc_by_layer.png")
    print(f"best layer {best['layer']}: AUROC {best['auroc_relative_mahalanobis']:.3f}; detector in {folder / 'detector'}")
    return 0


COMMANDS = {"best-of-n": eval_best_of_n, "elo": eval_elo, "ood": eval_ood, "robustness": eval_robustness}


def run(what: str, cfg: Config, run_dir: Path, args) -> int:
    try:
        return COMMANDS[what](cfg, run_dir, args)
    except DataError as e:
        print(f"hh-ray eval {what}: error: {e}", file=sys.stderr)
        return 2
