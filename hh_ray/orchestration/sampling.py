"""Policy samples for the evaluations (best-of-n, Elo, robustness), drawn by vLLM generation
workers as PPO's rollouts are: the HH prompt rendered in the policy's conversation format and
cut from the left to leave room for the response, the response ended with its turn, prompt i
seeded with `seed + i` whatever the policy (common random numbers: differences between
policies come from the policies, less from the draw). The PM scores them with
`hh_ray.sampling.score_samples`."""

from __future__ import annotations

import time

from actors.generation import GenerationPool
from hh_ray.config import Config
from hh_ray.conversation import model_format, render_prompt
from hh_ray.models import load_tokenizer


class PolicySampler:
    """`cfg.generation.num_workers` vLLM engines holding `policy_path`; `load` swaps in other
    weights of the same architecture (a PPO checkpoint's). Use it as a context manager: the
    engines are killed on leaving."""

    def __init__(self, cfg: Config, policy_path: str):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(policy_path)
        self.format = model_format(policy_path, cfg.model.conversation_format, self.tokenizer)
        self.pool = GenerationPool(policy_path, cfg.generation, cfg.model.max_seq_len, cfg.model.dtype, cfg.seed,
                                   conversation_format=self.format)

    def sample(self, prompts: list[str], n: int) -> list[list[str]]:
        """n responses to each HH prompt, [prompts][n]."""
        g = self.cfg.generation
        room = max(1, self.pool.max_model_len - g.max_new_tokens)
        rendered = [render_prompt(p, self.tokenizer, self.format) for p in prompts]
        ids = [r[-room:] for r in self.tokenizer(rendered, add_special_tokens=False)["input_ids"]]
        t0 = time.perf_counter()
        batch = self.pool.generate(ids, prompts, g.max_new_tokens, g.temperature, g.top_p, seed=self.cfg.seed, n=n)
        dt = time.perf_counter() - t0
        tokens = int(batch.response_lengths.sum())
        print(f"sampled {len(prompts)} prompts x {n} in {dt:.1f} s ({tokens} tokens, {tokens / max(dt, 1e-9):.0f} "
              f"tokens/s, {len(self.pool.workers)} generation worker(s))", flush=True)
        return [batch.responses[i * n:(i + 1) * n] for i in range(len(prompts))]

    def load(self, version: int, weights: dict) -> None:
        """Sample from `weights` (hh_ray.weights.weights_for_sync of a model) from now on."""
        self.pool.update_weights(version, weights)

    def __enter__(self) -> PolicySampler:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown()
