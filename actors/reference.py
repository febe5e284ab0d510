"""The reference model pi_0: log-probs of the initial policy for the KL term
r = r_PM - lambda_KL * KL(pi || pi_0) (Bai et al. 2022, §4.1).

An HF model in eval mode, never updated. Micro-batched, and each micro-batch
is cut to its own longest row, because the [B, T, V] logits dominate memory
(DESIGN.md §3: 0.9 GB for 16 x 300 tokens at SmolLM2's 49k vocabulary).
"""

from __future__ import annotations

import ray
import torch

from hh_ray.rollout import RolloutBatch


@ray.remote
class ReferenceModel:
    """Start with `start_reference_model`."""

    def __init__(self, model_path: str, dtype: str = "float32", micro_batch_size: int = 8,
                 temperature: float = 1.0, num_threads: int = 1):
        torch.set_num_threads(max(1, num_threads))
        from hh_ray.models import load_policy

        self.model = load_policy(model_path, dtype).eval()
        self.micro_batch_size = micro_batch_size
        # Same temperature as the sampler and the learner's log-probs, so that
        # log pi - log pi_0 compares the two policies on equal terms.
        self.temperature = temperature

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """[B, T] log-prob of each response token under pi_0, aligned like
        `behaviour_logprobs` (column t is token input_ids[:, t]; 0 outside the response)."""
        from hh_ray.ppo import policy_logprobs

        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        for s in range(0, len(batch), self.micro_batch_size):
            rows = slice(s, s + self.micro_batch_size)
            width = int(batch.attention_mask[rows].sum(-1).max())
            ids, mask = batch.input_ids[rows, :width], batch.attention_mask[rows, :width]
            out[rows, :width] = policy_logprobs(self.model, ids, mask, self.temperature).float()
        return out * batch.response_mask

    def attach(self, batch: RolloutBatch) -> RolloutBatch:
        """The batch with `ref_logprobs` filled in (pass an ObjectRef; it is resolved here)."""
        batch.ref_logprobs = self.logprobs(batch)
        return batch


def start_reference_model(model_path: str, dtype: str = "float32", num_cpus: float = 1, **kwargs):
    from hh_ray.cluster import worker_env

    return ReferenceModel.options(num_cpus=num_cpus, runtime_env={"env_vars": worker_env()}).remote(
        model_path, dtype, num_threads=max(1, int(num_cpus)), **kwargs)
