"""The PM scoring service: (prompt text, response text) -> one float per sample.

Vocabulary mismatch. The policy and the PM need not share a tokenizer (a
small policy scored by a larger PM, or a PM whose vocabulary grew by its
end-of-context and pad tokens). So the service never takes policy token ids:
it takes text in HH format, prompt ("\\n\\nHuman: ...\\n\\nAssistant:") plus the
decoded response, joins them into the transcript a labeller would read, and
re-tokenises that with the PM's own tokenizer (`pm_token_rows`: end-of-context
token appended, truncated from the left). The cost is one decode on the
generation side and one encode here; what is lost is only tokenisation
round-trip quirks of the policy, which the PM was never trained on anyway.

Batching. Calls that arrive within `batch_wait_ms` of each other are scored
in one forward pass (the actor is async; while one batch runs in a thread,
the next one collects).
"""

from __future__ import annotations

import asyncio
import os

import ray
import torch

from hh_ray.conversation import render_transcript
from hh_ray.runtime import device, resolve_autocast, set_torch_threads, worker_env


@ray.remote
class PMScorer:
    """Start with `start_pm_scorer`. A batched HF forward: vLLM's pooling runner was
    no faster on CPU unless prompts repeat (docs/architecture.md)."""

    def __init__(self, pm_path: str, max_len: int = 512, dtype: str = "float32", micro_batch_size: int = 16,
                 batch_wait_ms: float = 5.0, num_threads: int = 1, autocast: str = "none",
                 conversation_format: str = "hh"):
        set_torch_threads(num_threads)
        from hh_ray.models import load_scalar_head_model, store_linear_weights_in_bf16

        self.max_len = max_len
        self.micro_batch_size = micro_batch_size
        self.batch_wait = batch_wait_ms / 1000
        # 'bfloat16': the forward's matmuls in bf16. On the demo's trained PM (32 transcripts)
        # scores moved by -0.25 +- 0.22 against fp32 (score std 3.5, correlation 0.9993), and
        # the preferred response of 62 of 64 pairs stayed the same. 'auto' is resolved here, on
        # the device this service got, which need not be the learners' (ppo.pm_service_gpus).
        self.autocast, self.autocast_why = resolve_autocast(autocast)
        self.conversation_format = conversation_format
        self._pending: list[tuple[list[list[str]], asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self.model, self.tokenizer = load_scalar_head_model(pm_path, dtype)
        self.model.eval().to(device())  # its GPU when started with num_gpus
        self.device = device().type
        if self.autocast == "bfloat16":
            store_linear_weights_in_bf16(self.model)  # the same scores, half the memory

    def _score_now(self, groups: list[list[str]]) -> list[float]:
        from hh_ray.models import pm_group_scores

        scores = pm_group_scores(self.model, self.tokenizer, groups, self.max_len, self.micro_batch_size, self.autocast)
        return [x for g in scores for x in g]

    async def _flush(self) -> None:
        await asyncio.sleep(self.batch_wait)
        async with self._lock:  # one forward at a time; calls arriving meanwhile wait for the next
            batch, self._pending = self._pending, []
            self._flusher = None
            groups = [g for gs, _ in batch for g in gs]
            try:
                scores = await asyncio.to_thread(self._score_now, groups)
            except Exception as e:  # every waiting caller sees the error
                for _, fut in batch:
                    fut.set_exception(e)
                return
        s = 0
        for gs, fut in batch:
            n = sum(len(g) for g in gs)
            fut.set_result(scores[s: s + n])
            s += n

    def placement(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "gpus": ray.get_gpu_ids(),
                "device": self.device, "autocast": self.autocast, "autocast_why": self.autocast_why,
                "linear_weights": str(next(m.weight.dtype for m in self.model.modules()
                                           if isinstance(m, torch.nn.Linear))).removeprefix("torch.")}

    async def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """PM score of each conversation: an HH prompt and the assistant's response, rendered in
        the PM's conversation format."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return []
        fut = asyncio.get_running_loop().create_future()
        # Responses to one prompt (samples_per_prompt) arrive side by side: scored as one
        # packed row that computes their shared prompt once (hh_ray.packing).
        groups: list[list[str]] = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            text = render_transcript(p, r, self.tokenizer, self.conversation_format)
            if i and p == prompts[i - 1]:
                groups[-1].append(text)
            else:
                groups.append([text])
        self._pending.append((groups, fut))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await fut


def start_pm_scorer(pm_path: str, max_len: int = 512, dtype: str = "float32", num_cpus: float = 1,
                    num_gpus: float = 0, resources: dict | None = None, **kwargs):
    # max_concurrency lets calls from several producers reach the batching queue together.
    return PMScorer.options(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or {}, max_concurrency=64,
                            runtime_env={"env_vars": worker_env()}).remote(
        pm_path, max_len, dtype, num_threads=num_cpus, **kwargs)
