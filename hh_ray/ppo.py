"""PPO with a KL penalty, as small pure tensor functions (Bai et al. 2022, §4.1).

Alignment used throughout: a [B, T] tensor's column t belongs to token
`input_ids[:, t]`, the action taken at step t. Its log-prob comes from the
logits at t-1, and its value estimate V(s_t) is the critic's output at t-1
(the state is the prefix before the token). `mask` marks response tokens.

Loss aggregation:
- 'token_mean': mean over every response token in the batch (long responses
  weigh more);
- 'seq_mean': mean over each response's tokens, then over responses (every
  response weighs the same).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hh_ray.estimators import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, lookup


# ---------------------------------------------------------------- log-probs

def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """log softmax(logits)[label], [B, T]. Chunked over T so the full
    [B, T, V] log-softmax (V = 49k for SmolLM2) never exists at once in float32.
    `split`, not slicing: a slice's backward writes its chunk into a zeroed [B, T, V]
    gradient, once per chunk, while split's backward joins the chunks' gradients once."""
    out = []
    for lg, lab in zip(logits.split(chunk, 1), labels.split(chunk, 1)):
        lg = lg.float()
        out.append(lg.gather(-1, lab[..., None]).squeeze(-1) - torch.logsumexp(lg, -1))
    return torch.cat(out, 1)


def entropy_from_logits(logits: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    out = []
    for lg in logits.split(chunk, 1):
        logp = F.log_softmax(lg.float(), -1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out, 1)


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """Move per-position outputs from t-1 to t (column 0 becomes 0), giving the alignment above."""
    return F.pad(x[:, :-1], (1, 0))


def policy_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    temperature: float = 1.0, with_entropy: bool = False):
    """Log-prob of every token under a causal LM, aligned to the token ([B, T]; column 0 is 0).

    `temperature` divides the logits, matching the distribution vLLM sampled from.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    logp = F.pad(token_logprobs(logits, input_ids[:, 1:]), (1, 0))
    if not with_entropy:
        return logp
    return logp, F.pad(entropy_from_logits(logits), (1, 0))


def response_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                      temperature: float = 1.0, with_entropy: bool = False, entropy_grad: bool = True):
    """Like `policy_logprobs`, from the logits of the tokens at `positions` only.

    `logits` is [N, V]: one row per set entry of `positions` ([B, T], row-major
    order, column 0 never set), the logits that predict that token. The
    output layer and the softmax over the vocabulary then skip prompt and
    padding positions. Results are placed back in [B, T] alignment, 0 elsewhere.
    `entropy_grad=False` gives the entropy as a metric only: no graph through a
    second softmax over the vocabulary.
    """
    sel = positions.bool()
    labels = input_ids[sel]
    if temperature != 1.0:
        logits = logits / temperature

    def place(x):
        return torch.zeros(sel.shape, dtype=x.dtype).masked_scatter(sel, x)

    if not len(labels):  # zeros that keep the graph, so a backward through an empty micro-batch works
        empty = place(logits.sum(-1))
        return (empty, empty.detach()) if with_entropy else empty
    logp = place(token_logprobs(logits[None], labels[None])[0])
    if not with_entropy:
        return logp
    return logp, place(entropy_from_logits((logits if entropy_grad else logits.detach())[None])[0])


# ---------------------------------------------------------------- reward and advantages

def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi0) from samples of pi, by a registered estimator
    (hh_ray/estimators.py: k1 = log pi - log pi0, k3 = (r - 1) - log r with r = pi0/pi)."""
    return lookup(KL_ESTIMATORS, estimator, "ppo.kl_estimator")(logp, ref_logp)


def last_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """1 at each row's last response token."""
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
    out = torch.zeros_like(mask)
    out[torch.arange(mask.shape[0]), last] = 1
    return out * (mask.sum(1, keepdim=True) > 0)


def rewards(pm_score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token reward r_t = -lambda_KL * KL_t, plus the PM score on the last response token."""
    return (-kl_coef * kl + pm_score[:, None] * last_token_mask(mask)) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor, agg: str = "token_mean") -> torch.Tensor:
    mask = mask.to(x.dtype)
    if agg == "token_mean":
        return (x * mask).sum() / mask.sum().clamp(min=1)
    if agg == "seq_mean":
        per_seq = (x * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_seq[mask.sum(1) > 0].mean()
    raise ValueError(f"ppo.loss_agg: unknown aggregation {agg!r} (token_mean, seq_mean)")


def whiten(x: torch.Tensor, mask: torch.Tensor, all_reduce_sum=None, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries (masked-out entries become 0).

    `all_reduce_sum(tensor) -> tensor` sums the statistics over data-parallel ranks,
    so every rank whitens by the whole batch's mean and std, not its shard's."""
    m = mask.to(torch.float64)
    x64 = x.to(torch.float64)
    sums = torch.stack([(x64 * m).sum(), (x64 * x64 * m).sum(), m.sum()])
    if all_reduce_sum is not None:
        sums = all_reduce_sum(sums)
    mean = sums[0] / sums[2].clamp(min=1)
    std = (sums[1] / sums[2].clamp(min=1) - mean ** 2).clamp(min=1e-12).sqrt()
    return ((x64 - mean) / (std + eps)).to(x.dtype) * mask


@dataclass
class Experience:
    """What one scored batch teaches, per token ([B, T]) and per response ([B])."""
    kl: torch.Tensor            # the penalty's per-token KL estimate (ppo.kl_estimator)
    rewards: torch.Tensor       # -lambda_KL * kl, plus r_PM on the last response token
    advantages: torch.Tensor    # whitened when asked
    returns: torch.Tensor       # advantages (before whitening) + values: the critic's targets
    kl_k1: torch.Tensor         # [B] sum over the response of log pi - log pi0: the logged KL
    reward_total: torch.Tensor  # [B] the return the policy maximises: r_PM - lambda_KL * sum(kl)


def make_experience(pm_score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, values: torch.Tensor,
                    mask: torch.Tensor, *, kl_coef: float, kl_estimator: str = "k1",
                    advantage_estimator: str = "gae", gamma: float = 1.0, lam: float = 0.95,
                    whiten_advantages: bool = True, all_reduce_sum=None, groups: torch.Tensor | None = None,
                    kl_in: str = "reward") -> Experience:
    """The paper's RL step for one scored batch (Bai et al. 2022, §4.1):
    per-token KL against pi0, reward r = r_PM - lambda_KL * KL with r_PM on the last
    response token, advantages (GAE by default), and whitening over the whole batch.

    `logp` are the sampling policy's log-probs of the response tokens, `ref_logp`
    pi0's, `values` the critic's V(s_t) ([B, T], 0 outside the response). The logged
    KL is always k1 on the sampled tokens, whichever estimator the penalty uses, so
    the sqrt(KL) axis of every plot means the same thing.

    `groups` [B]: the prompt each sample answers, for the group estimators (default: each
    sample its own). `kl_in="loss"` leaves the KL out of the reward (the learner adds it to
    the policy loss instead, `kl_loss`)."""
    mask = mask.to(values.dtype)
    kl = kl_penalty(logp, ref_logp, kl_estimator) * mask
    r = rewards(pm_score, kl, mask, kl_coef if kl_in == "reward" else 0.0)
    estimate = lookup(ADVANTAGE_ESTIMATORS, advantage_estimator, "ppo.advantage_estimator")
    groups = torch.arange(len(pm_score), device=pm_score.device) if groups is None else groups
    adv, returns = estimate(r, values * mask, mask, groups, gamma, lam)
    if whiten_advantages and estimate.whiten:
        adv = whiten(adv, mask, all_reduce_sum)
    return Experience(kl=kl, rewards=r, advantages=adv, returns=returns,
                      kl_k1=((logp - ref_logp) * mask).sum(1), reward_total=r.sum(1))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
        gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (hh_ray/estimators.py), under its usual name."""
    return ADVANTAGE_ESTIMATORS["gae"](rewards, values, mask, None, gamma, lam)


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, agg: str = "token_mean") -> torch.Tensor:
    """`ppo.kl_in=loss`: the k3 estimate of KL(pi || pi0) on the sampled tokens as a loss term
    (differentiable in the current policy's `logp`), instead of a penalty in the reward."""
    return masked_mean(KL_ESTIMATORS["k3"](logp, ref_logp), mask, agg)


# ---------------------------------------------------------------- losses

def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
             clip_eps: float = 0.2, agg: str = "token_mean") -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: -min(rho * A, clip(rho, 1-eps, 1+eps) * A)."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, agg)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean((clipped > unclipped).float(), mask),
                 # k3 estimate of KL(old || new): how far this update moved the policy
                 "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_eps: float = 0.2, agg: str = "token_mean") -> torch.Tensor:
    """Clipped value loss: 0.5 * max((V - R)^2, (V_clipped - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask, agg)


def lr_factor(iteration: int, total: int, schedule: str = "constant", warmup: int = 0) -> float:
    """Multiplier of the base LR at an iteration."""
    if warmup and iteration < warmup:
        return (iteration + 1) / warmup
    frac = min(1.0, (iteration - warmup) / max(1, total - warmup))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - frac
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * frac))
    raise ValueError(f"ppo.lr_schedule: unknown schedule {schedule!r} (constant, linear, cosine)")
