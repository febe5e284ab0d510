"""Elo ratings from pairwise comparisons, fitted by maximum likelihood.

The paper reports models on an Elo scale (Bai et al. 2022, §2.4 and App. B.5): a model
rated ΔElo above another wins a comparison with probability
1 / (1 + 10^(−ΔElo/400)). That is a Bradley–Terry model with strengths
γ_i = 10^(Elo_i/400), so the maximum-likelihood ratings are the Bradley–Terry
MLE, found here with Hunter's (2004) MM iteration. Wins may be fractional
(a tie is ½ each; a PM judge gives σ(r_a − r_b)). Ratings are only defined
up to a shift; they are reported with mean 0.
"""

from __future__ import annotations

import math

import numpy as np

ELO_SCALE = 400.0
# ΔElo of a PM-score gap of 1: σ(Δr) = 1 / (1 + 10^(−ΔElo/400)) gives ΔElo = (400 / ln 10)·Δr ≈ 174·Δr,
# the paper's "ΔElo ≈ 174 ΔPM".
ELO_PER_PM_UNIT = ELO_SCALE / math.log(10)


def win_probability(delta_elo: float | np.ndarray) -> float | np.ndarray:
    """P(A beats B) when A is rated delta_elo above B."""
    return 1.0 / (1.0 + 10.0 ** (-np.asarray(delta_elo, dtype=float) / ELO_SCALE))


def elo_difference(p_win: float) -> float:
    """The ΔElo at which A beats B with probability p_win (inverse of win_probability)."""
    return ELO_SCALE * math.log10(p_win / (1 - p_win))


def win_matrix(num_players: int, games: list[tuple[int, int, float]]) -> np.ndarray:
    """W[i, j] = (possibly fractional) wins of i over j from (i, j, score_of_i) games, score in [0, 1]."""
    w = np.zeros((num_players, num_players))
    for i, j, s in games:
        w[i, j] += s
        w[j, i] += 1 - s
    return w


def judged_wins(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """(W, ties) from a judge's scores [players, prompts]: on each prompt, each pair of players is one
    game won by the higher score; equal scores (identical responses, say) are ties, dropped as the paper
    drops tied comparisons. W[i, j] = games i won against j."""
    s = np.asarray(scores, dtype=float)
    w = (s[:, None, :] > s[None, :, :]).sum(-1).astype(float)
    ties = int(np.triu((s[:, None, :] == s[None, :, :]).sum(-1), 1).sum())
    return w, ties


def soft_wins(scores: np.ndarray) -> np.ndarray:
    """Fractional wins from a judge's scores [players, prompts]: W[i, j] = Σ_prompts σ(s_i − s_j),
    the judge's preference probability of i over j read as a share of a game (no ties to drop)."""
    s = np.asarray(scores, dtype=float)
    return (1 / (1 + np.exp(-(s[:, None, :] - s[None, :, :])))).sum(-1) * (1 - np.eye(len(s)))


def fit_elo(wins: np.ndarray, iterations: int = 10_000, tol: float = 1e-10) -> np.ndarray:
    """Maximum-likelihood Elo ratings (mean 0) from a win matrix W[i, j] = wins of i over j.

    A player who won (or lost) every game has no finite MLE; a pseudo-game of
    one half-win each way against every opponent it met (a weak prior at
    ΔElo = 0) keeps every rating finite and barely moves the others.
    """
    w = np.asarray(wins, dtype=float).copy()
    games = w + w.T
    won, played = w.sum(1), games.sum(1)
    if np.any(played == 0):
        raise ValueError("every player needs at least one game")
    if np.any(won == 0) or np.any(won == played):
        w = w + 0.5 * (games > 0)
        games = w + w.T
        won = w.sum(1)
    gamma = np.ones(len(w))
    for _ in range(iterations):
        # Hunter's MM update: γ_i ← W_i / Σ_j n_ij / (γ_i + γ_j)
        new = won / (games / (gamma[:, None] + gamma[None, :])).sum(1)
        new /= np.exp(np.log(new).mean())  # fix the free scale each step
        if np.max(np.abs(np.log(new) - np.log(gamma))) < tol:
            gamma = new
            break
        gamma = new
    elo = ELO_SCALE * np.log10(gamma)
    return elo - elo.mean()


def log_likelihood(wins: np.ndarray, elo: np.ndarray) -> float:
    """Σ_ij W_ij log P(i beats j) under the ratings; the MLE maximises it."""
    p = win_probability(elo[:, None] - elo[None, :])
    mask = np.asarray(wins) > 0
    return float((np.asarray(wins)[mask] * np.log(p[mask])).sum())
