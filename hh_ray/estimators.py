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


def advantage_estimator(name: str):
    """Register f(rewards, values, mask, gamma, lam) -> (advantages, returns), all [B, T]."""
    def register(f):
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

@advantage_estimator("gae")
def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
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


def lookup(registry: dict[str, Callable], name: str, field: str) -> Callable:
    if name not in registry:
        raise ValueError(f"{field}: unknown estimator {name!r} ({', '.join(registry)})")
    return registry[name]
