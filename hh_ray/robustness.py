"""`hh-ray eval robustness`: train-PM vs test-PM (Bai et al. 2022, §4.5 "robustness").

    split the training comparisons 50:50 (deterministic by seed)
    -> train one PM on each half: the *train PM* and the *test PM*
    -> PPO against the train PM only, a checkpoint every `ppo.checkpoint_every` iterations
    -> sample every checkpoint (and the initial policy) on held-out prompts, score with both PMs
    -> both curves against √KL; where they part is where PPO starts exploiting the train PM

A PM's score is defined only up to a constant (the loss sees score
differences), so the curves are compared as *gains over the initial policy*,
Δr(k) = r(k) − r(0), each PM's own. Both PMs are fitted with the same
Bradley–Terry loss on equally many comparisons, so their units (log-odds of a
preference) are comparable and the gap Δr_train − Δr_test is in those units.

Where they part (`divergence_point`): the first checkpoint k ≥ 1 at which
  (a) the train-PM gain rose since checkpoint k−1 while the test-PM gain fell, or
  (b) the gap Δr_train(k) − Δr_test(k) exceeds `gap_threshold`.
None when neither happens within the run. (a) catches the paper's picture
(test reward turning down while train reward still climbs); (b) catches a
test reward that merely stalls while the train reward keeps going.

KL at a checkpoint (the x-axis) comes from the PPO metrics. Iteration i
trains on rollouts that policy version i−1 generated and logs their mean
KL(π‖π₀) per response, so the KL of checkpoint k (version k) is the `kl`
logged at iteration k+1. The last checkpoint's version generated no rollouts;
it takes the KL logged at its own iteration (version k−1's), the nearest
measurement, and its row says so (`kl_of_version`). (Measuring KL on the
scored held-out samples instead would need their sampled token ids:
re-tokenised decoded text gave biased, even negative, k1 estimates.)

The pure functions come first and need no cluster. `eval_robustness`, which
trains PMs and runs PPO, imports the learners and the controller lazily, as
the demo does.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

RULE = ("first checkpoint k ≥ 1 where the train-PM gain rose since k−1 while the test-PM gain fell, "
        "or where the gap Δr_train − Δr_test exceeds the threshold (gains over the initial policy, "
        "each PM's own)")


# ---------------------------------------------------------------- the math (pure)

def split_comparisons(items: list, seed: int) -> tuple[list, list]:
    """(train-PM half, test-PM half): a seeded shuffle cut in two; the halves are disjoint,
    cover every item and differ in size by at most one (the train half takes the odd one)."""
    idx = list(range(len(items)))
    random.Random(f"robustness/{seed}").shuffle(idx)
    cut = (len(items) + 1) // 2
    return [items[i] for i in sorted(idx[:cut])], [items[i] for i in sorted(idx[cut:])]


def gains(rewards: list[float]) -> list[float]:
    """Reward gain over the first point (the initial policy): r(k) − r(0)."""
    return [r - rewards[0] for r in rewards]


def divergence_point(train_rewards: list[float], test_rewards: list[float],
                     gap_threshold: float) -> tuple[int | None, str]:
    """(index of the first checkpoint where the curves part, why), or (None, why not). See the module doc."""
    if len(train_rewards) != len(test_rewards):
        raise ValueError("train and test curves must have one point per checkpoint each")
    g_train, g_test = gains(train_rewards), gains(test_rewards)
    for k in range(1, len(g_train)):
        gap = g_train[k] - g_test[k]
        if g_train[k] > g_train[k - 1] and g_test[k] < g_test[k - 1]:
            return k, (f"train-PM gain rose {g_train[k - 1]:+.3f} → {g_train[k]:+.3f} while test-PM gain fell "
                       f"{g_test[k - 1]:+.3f} → {g_test[k]:+.3f}")
        if gap > gap_threshold:
            return k, f"gap Δr_train − Δr_test = {gap:.3f} > {gap_threshold:g}"
    return None, f"the curves do not part within the run (largest gap {max(a - b for a, b in zip(g_train, g_test)):.3f})"


def checkpoint_kl(ppo_rows: list[dict], version: int) -> tuple[float, int]:
    """(KL(π‖π₀), the policy version it was measured on) for checkpoint `version`: the PPO metric `kl`
    logged at iteration version+1 (that version's rollouts), else at iteration `version` (the version
    before's, for a run's last checkpoint); (0, 0) for the initial policy."""
    if version == 0:
        return 0.0, 0
    kl = {r.get("step"): r.get("kl") for r in ppo_rows if r.get("kl") is not None}
    for step in (version + 1, version):
        if step in kl:
            return float(kl[step]), step - 1
    raise ValueError(f"no PPO metrics row with a 'kl' at step {version + 1} or {version}")


def robustness_table(iterations: list[int], kls: list[float], train_rewards: list[float],
                     test_rewards: list[float], kl_versions: list[int] | None = None) -> list[dict]:
    """One row per checkpoint: KL (and which version it was measured on), √KL, both PMs' mean rewards,
    their gains and the gap."""
    g_train, g_test = gains(train_rewards), gains(test_rewards)
    kl_versions = kl_versions or list(iterations)
    return [{"iteration": it, "kl": kl, "kl_of_version": kv, "sqrt_kl": math.sqrt(max(0.0, kl)),
             "reward_train_pm": a, "reward_test_pm": b, "gain_train_pm": ga, "gain_test_pm": gb, "gap": ga - gb}
            for it, kl, kv, a, b, ga, gb in zip(iterations, kls, kl_versions, train_rewards, test_rewards,
                                                g_train, g_test)]


def plot_robustness(table: list[dict], divergence: int | None, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["sqrt_kl"] for r in table]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(x, [r["gain_train_pm"] for r in table], "o-", ms=4, label="train PM (PPO optimised this)")
    ax.plot(x, [r["gain_test_pm"] for r in table], "s-", ms=4, label="test PM (held-out half)")
    for r in table:
        ax.annotate(str(r["iteration"]), (r["sqrt_kl"], r["gain_train_pm"]), fontsize=6,
                    xytext=(2, 3), textcoords="offset points")
    if divergence is not None:
        ax.axvline(table[divergence]["sqrt_kl"], color="tab:red", ls="--", lw=1,
                   label=f"curves part (iteration {table[divergence]['iteration']})")
    ax.axhline(0, color="grey", lw=0.6)
    ax.set(xlabel="√KL(π ‖ π₀)  (PPO metrics)", ylabel="PM reward gain over π₀",
           title="Robustness: train PM vs test PM")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ---------------------------------------------------------------- the command

def _data_folder(folder: Path, train: list, test: list) -> Path:
    """A local comparison source with train.jsonl and test.jsonl, which train-pm and train-ppo read as
    data.split=train / data.eval_split=test: the learners run unchanged on exactly these pairs."""
    from hh_ray.data import write_jsonl

    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, folder / "train.jsonl")
    write_jsonl(test, folder / "test.jsonl")
    return folder


def _on_data(cfg, folder: Path, **overrides):
    import copy

    from hh_ray.config import set_value

    c = copy.deepcopy(cfg)
    for k, v in {"data.source": str(folder), "data.data_dir": "", "data.split": "train", "data.eval_split": "test",
                 "data.max_examples": 0, **overrides}.items():
        set_value(c, k, v)
    return c


def policy_checkpoints(ppo_dir: Path) -> list[tuple[int, Path]]:
    """(iteration, policy folder) of every complete PPO checkpoint, in order."""
    out = []
    for p in Path(ppo_dir, "checkpoints").glob("iter-*"):
        if (p / "policy" / "config.json").exists() and p.name[5:].isdigit():
            out.append((int(p.name[5:]), p / "policy"))
    return sorted(out)


def eval_robustness(cfg, run_dir: Path, args) -> int:
    from hh_ray.controller import train_ppo
    from hh_ray.models import is_scalar_head_model, load_policy, load_scalar_head_model, load_tokenizer, resolve_model
    from hh_ray.pm_eval import pm_comparisons
    from hh_ray.sampling import sample_responses, score_samples
    from hh_ray.tracking import read_metrics
    from learners.pm_learner import train_pm

    folder = Path(run_dir) / "robustness"
    train, held_out = pm_comparisons(cfg)
    half_train, half_test = split_comparisons(train, cfg.seed)
    print(f"robustness: {len(train)} comparisons → train-PM half {len(half_train)}, test-PM half "
          f"{len(half_test)}; {len(held_out)} held out (prompts for scoring, PM accuracy)", flush=True)

    # Reuse what an earlier (interrupted) run of this command finished in the same folder.
    pms = {}
    for name, half in (("train_pm", half_train), ("test_pm", half_test)):
        pm_run = folder / name
        if is_scalar_head_model(str(pm_run / "pm")):
            print(f"robustness: reusing {pm_run / 'pm'}", flush=True)
        else:
            print(f"robustness: training the {name.replace('_', '-')} on {len(half)} comparisons", flush=True)
            train_pm(_on_data(cfg, _data_folder(folder / "data" / name, half, held_out)), pm_run)
        pms[name] = str(pm_run / "pm")

    ppo_dir = folder / "ppo"
    if not (ppo_dir / "policy" / "config.json").exists():
        print(f"robustness: PPO against the train PM, checkpoint every {cfg.ppo.checkpoint_every} iterations",
              flush=True)
        # PPO draws its prompts from all training comparisons, never from the held-out ones scored below.
        train_ppo(_on_data(cfg, _data_folder(folder / "data" / "ppo", train, held_out), **{"model.pm": pms["train_pm"]}),
                  ppo_dir)
    ppo_rows = read_metrics(ppo_dir, "ppo", last_per_step=True)

    policy0 = resolve_model(cfg.model.policy, cfg.model.cache_dir)
    checkpoints = [(0, Path(policy0))] + policy_checkpoints(ppo_dir)
    prompts = list(dict.fromkeys(c.prompt for c in held_out))[: args.num_prompts]
    room = cfg.model.max_seq_len - cfg.generation.max_new_tokens
    samples = []
    tok = load_tokenizer(policy0)
    for it, path in checkpoints:
        # The same seed for every checkpoint (common random numbers): differences between
        # checkpoints come from the policies, less from the draw.
        model = load_policy(str(path), cfg.model.dtype)
        samples.append(sample_responses(model, tok, prompts, args.samples_per_prompt, cfg.generation.max_new_tokens,
                                        cfg.generation.temperature, room, seed=cfg.seed))
        print(f"robustness: sampled iteration {it} ({len(prompts)} prompts × {args.samples_per_prompt})", flush=True)
        del model
    rewards = {}
    for name, pm_dir in pms.items():
        pm, pm_tok = load_scalar_head_model(pm_dir, cfg.model.dtype)
        rewards[name] = [float(score_samples(pm, pm_tok, prompts, s, cfg.model.max_seq_len).mean()) for s in samples]
        del pm

    iterations = [it for it, _ in checkpoints]
    kls = [checkpoint_kl(ppo_rows, it) for it in iterations]
    table = robustness_table(iterations, [kl for kl, _ in kls], rewards["train_pm"], rewards["test_pm"],
                             [v for _, v in kls])
    k, why = divergence_point(rewards["train_pm"], rewards["test_pm"], args.gap_threshold)
    pm_acc = {}
    for name in pms:
        ev = folder / name / "pm_eval" / "pm_eval.json"  # train_pm's held-out evaluation
        if ev.exists():
            pm_acc[f"{name}_heldout_accuracy"] = json.loads(ev.read_text()).get("accuracy")
    finding = (f"The curves part at iteration {table[k]['iteration']} (√KL = {table[k]['sqrt_kl']:.3f}): {why}."
               if k is not None else f"No divergence: {why}.")
    results = {"method": (f"{len(train)} training comparisons split 50:50 by seed {cfg.seed} "
                          f"({len(half_train)} / {len(half_test)}); one PM trained on each half; PPO against the "
                          f"train PM for {cfg.ppo.iterations} iterations, checkpoint every {cfg.ppo.checkpoint_every}; "
                          f"each checkpoint and π₀ sampled on {len(prompts)} held-out prompts × "
                          f"{args.samples_per_prompt} (HF generate, same seed), mean score by both PMs. Curves are "
                          "gains over π₀; KL from the PPO metrics, measured on the rollouts of the policy version in "
                          "kl_of_version (the checkpoint's own, or the one before for the last). Divergence: " + RULE
                          + f"; threshold {args.gap_threshold:g}."),
               "finding": finding,
               "divergence_iteration": table[k]["iteration"] if k is not None else "none",
               "divergence_sqrt_kl": table[k]["sqrt_kl"] if k is not None else "none",
               "gap_threshold": args.gap_threshold, "split_seed": cfg.seed,
               "train_pm_comparisons": len(half_train), "test_pm_comparisons": len(half_test),
               **pm_acc, "train_pm": pms["train_pm"], "test_pm": pms["test_pm"], "ppo_run": str(ppo_dir),
               "table": table}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "robustness.json").write_text(json.dumps(results, indent=2))
    plot_robustness(table, k, folder / "robustness.png")
    print(f"{'iter':>4} {'√KL':>7} {'(of v)':>6} {'train PM':>9} {'test PM':>9} {'gap':>7}  (gains over π₀)")
    for r in table:
        print(f"{r['iteration']:>4} {r['sqrt_kl']:>7.3f} {r['kl_of_version']:>6} {r['gain_train_pm']:>+9.4f} "
              f"{r['gain_test_pm']:>+9.4f} {r['gap']:>+7.3f}")
    print(finding)
    print(f"saved to {folder}")
    return 0
