"""Best-of-n (rejection sampling) with the PM: reward against KL, given two ways.

The paper compares RL with rejection sampling on the reward-vs-√KL axes
(Bai et al. 2022, §4.3 and Fig. 36): draw n samples from π₀, keep the one the
PM scores highest. Its KL from π₀ is known without sampling, and is given
here both ways, each labelled, in nats per response (the unit of the PPO
runs' `kl`, summed over the response tokens):

    kl_log_n  = log n                 the paper's value
    kl_exact  = log n − (n − 1)/n     the closed form for best-of-n: exact when
                                      no two samples of a prompt coincide, an
                                      upper bound on the true KL otherwise

The exact value is below the paper's by (n − 1)/n < 1 nat, which moves the
best-of-n points left on the √KL axis, most at small n (n = 2: √0.69 = 0.83
against √0.19 = 0.44), so the labels matter when best-of-n is set beside RL.

The expected best-of-n reward is estimated from N ≥ n scored samples per
prompt without drawing subsets at random: over all C(N, n) subsets, the i-th
smallest score (1-based) is the maximum of C(i − 1, n − 1) of them, so

    E[max of n] = Σ_i C(i − 1, n − 1) / C(N, n) · s_(i)

which is the unbiased estimate with the least variance.
"""

from __future__ import annotations

import math

import numpy as np

from hh_ray.reward_kl import save_reward_axes


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")


def best_of_n_kl_log_n(n: int) -> float:
    """KL(best-of-n ‖ π₀) as the paper gives it: log n, in nats."""
    _check_n(n)
    return math.log(n)


def best_of_n_kl_exact(n: int) -> float:
    """KL(best-of-n ‖ π₀) = log n − (n − 1)/n, in nats: exact for distinct samples (not the paper's value)."""
    _check_n(n)
    return math.log(n) - (n - 1) / n


def max_weights(num_samples: int, n: int) -> np.ndarray:
    """w_i = C(i − 1, n − 1) / C(N, n): the chance that the i-th smallest of N is the max of a random n-subset."""
    if not 1 <= n <= num_samples:
        raise ValueError(f"need 1 <= n <= N, got n={n}, N={num_samples}")
    total = math.comb(num_samples, n)
    return np.array([math.comb(i - 1, n - 1) / total for i in range(1, num_samples + 1)])


def expected_best_of_n(scores: np.ndarray, n: int) -> float:
    """Mean over prompts of E[max PM score of n samples], from scores [prompts, N]."""
    scores = np.sort(np.asarray(scores, dtype=float), axis=1)
    return float((scores @ max_weights(scores.shape[1], n)).mean())


def best_of_n_curve(scores: np.ndarray, ns: list[int] | None = None) -> list[dict]:
    """One row per n (default 1, 2, 4, … up to N): n, the expected PM reward, and the KL both ways
    (`kl_log_n`, the paper's; `kl_exact`) with their square roots."""
    big_n = np.asarray(scores).shape[1]
    ns = ns or [2 ** k for k in range(int(math.log2(big_n)) + 1)]
    rows = []
    for n in ns:
        kl_paper, kl_exact = best_of_n_kl_log_n(n), best_of_n_kl_exact(n)
        rows.append({"n": n, "reward_pm": expected_best_of_n(scores, n), "kl_log_n": kl_paper,
                     "kl_exact": kl_exact, "sqrt_kl_log_n": math.sqrt(kl_paper), "sqrt_kl_exact": math.sqrt(kl_exact)})
    return rows


def plot_best_of_n(curve: list[dict], ppo_rows: list[dict], out) -> None:
    """Best-of-n and the PPO run (if any) on the paper's axes: PM reward against √KL. Best-of-n is
    drawn at both KLs, each labelled, since they differ most where the curves start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    y = [r["reward_pm"] for r in curve]
    ax.plot([r["sqrt_kl_log_n"] for r in curve], y, "s-", label="best-of-n, KL = log n (paper)")
    ax.plot([r["sqrt_kl_exact"] for r in curve], y, "s--", mfc="none",
            label="best-of-n, KL = log n − (n−1)/n (exact)")
    for r in curve:
        ax.annotate(f"n={r['n']}", (r["sqrt_kl_log_n"], r["reward_pm"]), fontsize=7, xytext=(3, -9),
                    textcoords="offset points")
    pts = [(math.sqrt(max(0.0, r["kl"])), r["reward_pm"]) for r in ppo_rows if r.get("kl") is not None]
    if pts:
        x, y = zip(*pts)
        ax.plot(x, y, "o", ms=3, alpha=0.6, label="PPO iterations (measured KL)")
    save_reward_axes(fig, ax, out, "RL vs rejection sampling")
