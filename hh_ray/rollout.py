"""The rollout batch: what generation actors produce and the learner trains on.

A plain dataclass of tensors that travels as one ObjectRef. Token positions are
aligned with `input_ids`: `behaviour_logprobs[i, t]` is the log-prob of token
`input_ids[i, t]` under the policy that sampled it (0 outside the response).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor           # [B, T] prompt + response, right-padded
    attention_mask: torch.Tensor      # [B, T] 1 on prompt and response tokens
    response_mask: torch.Tensor       # [B, T] 1 on response tokens only
    behaviour_logprobs: torch.Tensor  # [B, T] sampler's log-probs at response positions
    policy_version: torch.Tensor      # [B] version of the weights that made each sample
    prompts: list[str]
    responses: list[str]
    finish_reasons: list[str]
    pm_score: torch.Tensor | None = None      # [B] PM score of prompt + response
    ref_logprobs: torch.Tensor | None = None  # [B, T] initial policy's log-probs, same alignment

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

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


def drop_nonfinite(batch: RolloutBatch) -> tuple[RolloutBatch, int]:
    """Rows with a NaN/inf PM score or behaviour log-prob removed, and how many.
    One such sample would poison the whole update (NaN advantages after whitening)."""
    ok = torch.isfinite(batch.pm_score) & torch.isfinite(batch.behaviour_logprobs).all(1)
    dropped = int((~ok).sum())
    return (batch.select(ok.nonzero().squeeze(1)) if dropped else batch), dropped
