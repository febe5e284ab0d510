"""The rollout batch: what generation actors produce and the learner trains on.

A plain dataclass of tensors that travels as one ObjectRef. Token positions are
aligned with `input_ids`: `behaviour_logprobs[i, t]` is the log-prob of token
`input_ids[i, t]` under the policy that sampled it (0 outside the response).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


def tokens_before_stop(token_ids: list[int], text: str, decode) -> int:
    """How many of a response's tokens lie before its stop string.

    vLLM cuts the text before the stop string but keeps the tokens up to the one
    that completed it; the trained response must end where the scored text does.
    `text` is the cut text, `decode(ids) -> str`. A token that straddles the cut
    is dropped with the stop string."""
    lo, hi = 0, len(token_ids)
    while lo < hi:  # the longest prefix whose text fits in `text` (decoded length grows with the prefix)
        mid = (lo + hi + 1) // 2
        if len(decode(token_ids[:mid])) <= len(text):
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor           # [B, T] prompt + response, right-padded
    attention_mask: torch.Tensor      # [B, T] 1 on prompt and response tokens
    response_mask: torch.Tensor       # [B, T] 1 on response tokens only
    behaviour_logprobs: torch.Tensor  # [B, T] sampler's log-probs at response positions
    policy_version: torch.Tensor      # [B] version of the weights that made each sample
    prompts: list[str]
    responses: list[str]
    finish_reasons: list[str]         # 'stop': the response ended its turn; 'length': cut at max_new_tokens
    pm_score: torch.Tensor | None = None      # [B] PM score of prompt + response
    ref_logprobs: torch.Tensor | None = None  # [B, T] initial policy's log-probs, same alignment
    group: torch.Tensor | None = None         # [B] the prompt (within the batch) each sample answers

    def groups(self) -> torch.Tensor:
        """[B] group ids: `group`, or each sample its own (one sample per prompt)."""
        return torch.arange(len(self)) if self.group is None else self.group.cpu()

    def shard_rows(self, rank: int, world: int) -> list[int]:
        """The rows learner `rank` of `world` trains on: whole groups, dealt round-robin (one
        sample per prompt: rows rank, rank + world, …)."""
        return [i for i, g in enumerate(self.groups().tolist()) if g % world == rank]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    @property
    def ended(self) -> torch.Tensor:
        """[B] True where the response ended its turn by itself (not cut at the token cap)."""
        return torch.tensor([r == "stop" for r in self.finish_reasons])

    @classmethod
    def from_samples(cls, prompt_ids: list[list[int]], response_ids: list[list[int]],
                     logprobs: list[list[float]], versions: list[int], prompts: list[str],
                     responses: list[str], finish_reasons: list[str], pad_id: int) -> "RolloutBatch":
        """Pack ragged samples into right-padded tensors."""
        width = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
        b = len(prompt_ids)
        ids = torch.full((b, width), pad_id, dtype=torch.long)
        attn = torch.zeros((b, width), dtype=torch.long)
        resp = torch.zeros((b, width), dtype=torch.long)
        lp = torch.zeros((b, width), dtype=torch.float32)
        for i, (p, r, l) in enumerate(zip(prompt_ids, response_ids, logprobs)):
            n, m = len(p), len(r)
            ids[i, : n + m] = torch.tensor(list(p) + list(r), dtype=torch.long)
            attn[i, : n + m] = 1
            resp[i, n: n + m] = 1
            lp[i, n: n + m] = torch.tensor(l, dtype=torch.float32)
        return cls(ids, attn, resp, lp, torch.tensor(versions, dtype=torch.long),
                   list(prompts), list(responses), list(finish_reasons))

    def select(self, idx) -> "RolloutBatch":
        """Rows `idx` (a list or tensor of indices)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v[idx]
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in idx.tolist()]
            else:
                out[f.name] = v
        return replace(self, **out)

    def to(self, device) -> "RolloutBatch":
        """Every tensor on `device` (the learner's)."""
        return replace(self, **{f.name: v.to(device) for f in fields(self)
                                if isinstance(v := getattr(self, f.name), torch.Tensor)})

    @staticmethod
    def concat(batches: list["RolloutBatch"], pad_id: int) -> "RolloutBatch":
        """Join batches, padding every [B, T] tensor to the widest."""
        width = max(b.input_ids.shape[1] for b in batches)
        out = {}
        for f in fields(RolloutBatch):
            vals = [getattr(b, f.name) for b in batches]
            if any(v is None for v in vals):
                out[f.name] = None
            elif isinstance(vals[0], list):
                out[f.name] = [x for v in vals for x in v]
            elif vals[0].dim() == 2:
                fill = pad_id if f.name == "input_ids" else 0
                out[f.name] = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1]), value=fill) for v in vals])
            else:
                out[f.name] = torch.cat(vals)
        return RolloutBatch(**out)


def drop_nonfinite(batch: RolloutBatch, multiple: int = 1) -> tuple[RolloutBatch, int]:
    """Rows with a NaN/inf PM score or behaviour log-prob removed, and how many rows were dropped in all.
    One such sample would poison the whole update (NaN advantages after whitening).

    Whole groups go (a prompt's samples_per_prompt responses: a critic-free baseline needs all
    of them), and `multiple`, the number of learners, which deal the batch out group by group
    (RolloutBatch.shard_rows): after a drop the fewest more groups (the last kept ones) go too,
    so that their count still divides by it, and the groups are numbered again from 0. Every
    learner then gets as many rows, hence as many minibatch and micro-batch steps (unequal
    shards would leave one rank waiting in a collective the others never join: a DDP hang).
    """
    ok = torch.isfinite(batch.pm_score) & torch.isfinite(batch.behaviour_logprobs).all(1)
    groups = batch.groups()
    bad = set(groups[~ok].tolist())
    kept = [g for g in dict.fromkeys(groups.tolist()) if g not in bad]
    kept = kept[: len(kept) - len(kept) % max(1, multiple)]
    renumber = {g: i for i, g in enumerate(kept)}
    keep = [i for i, g in enumerate(groups.tolist()) if g in renumber]
    dropped = len(batch) - len(keep)
    if not dropped:
        return batch, 0
    out = batch.select(keep)
    if out.group is not None:
        out.group = torch.tensor([renumber[g] for g in groups[keep].tolist()], dtype=batch.group.dtype)
    return out, dropped
