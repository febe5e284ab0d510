"""The estimators the RL step can be built from, each one function behind a registry.

Adding one is one function and one decorator line: the config's allowed values
(`ppo.kl_estimator`, `ppo.advantage_estimator`) are read from these registries.
This module imports no torch at the top, so reading the names (the config
loader, `hh-ray --help`) stays cheap; the functions take and return tensors.

Alignment, as in hh_ray/ppo.py: a [B, T] tensor's column t belongs to token t;
`mask` marks the response tokens.
"""

from __future__ import annotations

from typing import Callable

KL_ESTIMATORS: dict[str, Callable] = {}
ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}


def kl_estimator(name: str):
    """Register f(logp, ref_logp) -> per-token estimate of KL(pi || pi0) from samples of pi."""
    def register(f):
        KL_ESTIMATORS[name] = f
        return f
    return register


def advantage_estimator(name: str, critic: bool, whiten: bool):
    """Register f(rewards, values, mask, groups, gamma, lam) -> (advantages, returns), all [B, T].

    `groups` [B]: which prompt each sample answers (samples of one prompt share an id).
    `critic`: the estimator reads `values` (without one no critic is built, trained or
    checkpointed, and `values` are zeros); `whiten`: the batch whitening of
    `ppo.whiten_advantages` applies (the group-normalised estimators normalise themselves)."""
    def register(f):
        f.critic, f.whiten = critic, whiten
        ADVANTAGE_ESTIMATORS[name] = f
        return f
    return register


# ---------------------------------------------------------------- KL(pi || pi0) per token

@kl_estimator("k1")
def kl_k1(logp, ref_logp):
    """log pi - log pi0: unbiased, can be negative per token."""
    return logp - ref_logp


@kl_estimator("k3")
def kl_k3(logp, ref_logp):
    """(r - 1) - log r with r = pi0/pi: unbiased, never negative, lower variance."""
    log_ratio = logp - ref_logp
    return (-log_ratio).expm1() + log_ratio


# ---------------------------------------------------------------- advantages

@advantage_estimator("gae", critic=True, whiten=True)
def gae(rewards, values, mask, groups=None, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over the response tokens; the episode ends
    after the last one (its next value is 0). Returns (advantages, returns)."""
    mask = mask.to(values.dtype)
    adv = values.new_zeros(values.shape)
    last_gae = values.new_zeros(values.shape[:1])
    next_value = values.new_zeros(values.shape[:1])
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        g = delta + gamma * lam * last_gae
        adv[:, t] = g * m
        last_gae = g.where(m > 0, last_gae)
        next_value = values[:, t].where(m > 0, next_value)
    return adv, (adv + values) * mask


# Critic-free, outcome-based: one sequence-level return R_i (the PM score, less the KL
# penalty when it is in the reward), compared within the group of samples of one prompt,
# and the same advantage for every response token of the sample.

def group_mean_std(x, groups):
    """Per-sample mean and (population) std of `x` [B] over the samples of its group."""
    import torch

    ids, inverse = torch.unique(groups, return_inverse=True)
    count = torch.zeros(len(ids), dtype=x.dtype, device=x.device).index_add_(0, inverse, torch.ones_like(x))
    total = torch.zeros_like(count).index_add_(0, inverse, x)
    mean = (total / count)[inverse]
    var = torch.zeros_like(count).index_add_(0, inverse, (x - mean) ** 2) / count
    return mean, var[inverse].sqrt(), count[inverse]


def _per_token(adv_seq, mask):
    mask = mask.to(adv_seq.dtype)
    return adv_seq[:, None] * mask


@advantage_estimator("grpo", critic=False, whiten=False)
def grpo(rewards, values, mask, groups, gamma: float = 1.0, lam: float = 0.95, eps: float = 1e-6):
    """GRPO (Shao et al. 2024): (R_i - mean of its group) / (std of its group + eps)."""
    r = (rewards * mask.to(rewards.dtype)).sum(1)
    mean, std, _ = group_mean_std(r, groups)
    adv = _per_token((r - mean) / (std + eps), mask)
    return adv, adv


@advantage_estimator("grpo_no_std", critic=False, whiten=False)
def grpo_no_std(rewards, values, mask, groups, gamma: float = 1.0, lam: float = 0.95):
    """GRPO without the std division (Dr. GRPO, Liu et al. 2025): R_i - mean of its group."""
    r = (rewards * mask.to(rewards.dtype)).sum(1)
    mean, _, _ = group_mean_std(r, groups)
    adv = _per_token(r - mean, mask)
    return adv, adv


@advantage_estimator("rloo", critic=False, whiten=False)
def rloo(rewards, values, mask, groups, gamma: float = 1.0, lam: float = 0.95):
    """REINFORCE leave-one-out (Ahmadian et al. 2024): R_i - mean of the other samples of its
    group = n/(n-1) (R_i - group mean); 0 for a sample alone in its group."""
    r = (rewards * mask.to(rewards.dtype)).sum(1)
    mean, _, n = group_mean_std(r, groups)
    adv = _per_token(((r - mean) * n / (n - 1).clamp(min=1)).where(n > 1, r.new_zeros(())), mask)
    return adv, adv


@advantage_estimator("reinforce_pp", critic=False, whiten=True)
def reinforce_pp(rewards, values, mask, groups=None, gamma: float = 1.0, lam: float = 0.95):
    """REINFORCE++ (Hu 2025): the return from each token, sum_{k>=t} gamma^(k-t) r_k with the
    per-token KL penalty in r, then normalised over the whole batch (the whitening)."""
    mask = mask.to(rewards.dtype)
    ret = rewards.new_zeros(rewards.shape)
    running = rewards.new_zeros(rewards.shape[:1])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] * mask[:, t] + gamma * running * mask[:, t]
        ret[:, t] = running
    return ret * mask, ret * mask


def needs_critic(name: str) -> bool:
    return lookup(ADVANTAGE_ESTIMATORS, name, "ppo.advantage_estimator").critic


def lookup(registry: dict[str, Callable], name: str, field: str) -> Callable:
    if name not in registry:
        raise ValueError(f"{field}: unknown estimator {name!r} ({', '.join(registry)})")
    return registry[name]
