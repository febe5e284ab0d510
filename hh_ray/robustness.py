"""`hh-ray eval robustness`: train-PM vs test-PM (Bai et al. 2022, §4.2, "Robustness Experiments").

    split the training comparisons 50:50 (deterministic by seed)
    -> train one PM on each half: the *train PM* and the *test PM*
    -> PPO against the train PM only, a checkpoint every `ppo.checkpoint_every` iterations
    -> sample every checkpoint (and the initial policy) on held-out prompts, score with both PMs
    -> both curves against √KL; where they part is where PPO starts exploiting the train PM

The paper's robustness runs used their own PPO settings: 2 PPO epochs per batch
(its main runs 1, its online runs 4), 32-token responses and a linear learning-rate
warm-up; `configs/robustness.yaml` ships them (ppo.epochs, generation.max_new_tokens,
ppo.warmup_iterations).

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

This module is the pure part and needs no cluster; the command that trains
PMs and runs PPO is `hh_ray.orchestration.robustness`.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

RULE = ("first checkpoint k ≥ 1 where the train-PM gain rose since k−1 while the test-PM gain fell, "
        "each by more than min_move (so that sampling noise does not count), or where the gap Δr_train − Δr_test exceeds the threshold (gains over the initial policy, "
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
                     gap_threshold: float, min_move: float = 0.0) -> tuple[int | None, str]:
    """(index of the first checkpoint where the curves part, why), or (None, why not). See the module doc."""
    if len(train_rewards) != len(test_rewards):
        raise ValueError("train and test curves must have one point per checkpoint each")
    g_train, g_test = gains(train_rewards), gains(test_rewards)
    for k in range(1, len(g_train)):
        gap = g_train[k] - g_test[k]
        if g_train[k] > g_train[k - 1] + min_move and g_test[k] < g_test[k - 1] - min_move:
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
