"""Policy samples for the evaluations (best-of-n, Elo, robustness), drawn by vLLM generation
workers as PPO's rollouts are: the HH prompt rendered in the policy's conversation format and
cut from the left to leave room for the response, the response ended with its turn, prompt i
seeded with `seed + i` whatever the policy (common random numbers: differences between
policies come from the policies, less from the draw). The PM scores them with
`hh_ray.sampling.score_samples`."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from actors.generation import GenerationPool
from hh_ray.config import Config
from hh_ray.conversation import model_format, prompt_token_ids
from hh_ray.models import load_tokenizer


# Keys of config.json and generation_config.json that name or describe a folder without
# changing what an engine built from it computes.
_NOT_ARCHITECTURE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}


def weight_files(path: str) -> list[str]:
    """The safetensors files of an HF model folder (one, or the shards of a large model)."""
    return [str(f) for f in sorted(Path(path).glob("*.safetensors"))]


def engine_signature(path: str, tokenizer, fmt: str) -> str:
    """All an engine built for `path` takes from it besides the weights: the model and generation
    configs (up to names and versions), the tokenizer's vocabulary, special tokens and chat
    template, and the conversation format. Two folders with one signature can share engines."""
    from transformers import AutoConfig, GenerationConfig

    config = {k: v for k, v in AutoConfig.from_pretrained(path).to_dict().items() if k not in _NOT_ARCHITECTURE}
    try:
        gen = {k: v for k, v in GenerationConfig.from_pretrained(path).to_dict().items() if k not in _NOT_ARCHITECTURE}
    except OSError:  # no generation_config.json
        gen = {}
    return json.dumps([config, gen, sorted(tokenizer.get_vocab().items()), tokenizer.special_tokens_map,
                       tokenizer.chat_template, fmt], sort_keys=True, default=str)


class PolicySampler:
    """`cfg.generation.num_workers` vLLM engines holding `policy_path`; `load` swaps in other
    weights of the same architecture (another policy folder's, a PPO checkpoint's). Use it as a
    context manager: the engines are killed on leaving."""

    def __init__(self, cfg: Config, policy_path: str):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(policy_path)
        self.format = model_format(policy_path, cfg.model.conversation_format, self.tokenizer)
        self.path = policy_path
        self.pool = GenerationPool(policy_path, cfg.generation, cfg.model.max_seq_len, cfg.model.dtype, cfg.seed,
                                   conversation_format=self.format)

    def sample(self, prompts: list[str], n: int, seed: int | None = None) -> list[list[str]]:
        """n responses to each HH prompt, [prompts][n]; prompt i seeded with `seed` + i
        (default: the run's seed)."""
        g = self.cfg.generation
        seed = self.cfg.seed if seed is None else seed
        room = max(1, self.pool.max_model_len - g.max_new_tokens)
        ids = [r[-room:] for r in prompt_token_ids(prompts, self.tokenizer, self.format)]
        t0 = time.perf_counter()
        batch = self.pool.generate(ids, prompts, g.max_new_tokens, g.temperature, g.top_p, seed=seed, n=n)
        dt = time.perf_counter() - t0
        tokens = int(batch.response_lengths.sum())
        print(f"sampled {len(prompts)} prompts x {n} in {dt:.1f} s ({tokens} tokens, {tokens / max(dt, 1e-9):.0f} "
              f"tokens/s, {len(self.pool.workers)} generation worker(s))", flush=True)
        return [batch.responses[i * n:(i + 1) * n] for i in range(len(prompts))]

    def load(self, version: int, files: list[str]) -> None:
        """Sample from the state dict in these safetensors `files` from now on. Each generation
        worker reads them on its own node: a large policy never passes through the driver."""
        self.pool.load_files(version, files)

    def fits(self, policy_path: str) -> bool:
        """True when `policy_path`'s weights can be `load`ed into these engines and sampled as
        a sampler of its own would (engine_signature; its weights in safetensors files)."""
        if not weight_files(policy_path):
            return False
        tok = load_tokenizer(policy_path)
        fmt = model_format(policy_path, self.cfg.model.conversation_format, tok)
        return engine_signature(policy_path, tok, fmt) == self._signature

    @functools.cached_property
    def _signature(self) -> str:  # read only when `fits` is asked (eval elo, online rounds)
        return engine_signature(self.path, self.tokenizer, self.format)

    def __enter__(self) -> PolicySampler:
        return self

    def close(self) -> None:
        self.pool.shutdown()

    def __exit__(self, *exc) -> None:
        self.close()


def sample_policies(cfg: Config, policy_paths: list[str], prompts: list[str], ns: list[int],
                    seeds: list[int | None] | None = None) -> list[list[list[str]]]:
    """ns[k] responses to each prompt from policy k, [policies][prompts][n], drawn in turn: one
    set of engines at a time, so no more GPUs or memory than one policy's. Policies of one
    architecture (PolicySampler.fits) share the engines, each one's weights loaded in turn; the
    same folder twice in a row is sampled again without reloading. seeds[k]: policy k's seed
    (PolicySampler.sample)."""
    out, sampler, current = [], None, None
    try:
        for k, (path, n) in enumerate(zip(policy_paths, ns)):
            if path != current:
                if sampler is not None and sampler.fits(path):
                    sampler.load(k, weight_files(path))
                else:
                    if sampler is not None:
                        sampler.close()
                        sampler = None  # not closed twice should the next one fail to start
                    sampler = PolicySampler(cfg, path)
                current = path
            out.append(sampler.sample(prompts, n, None if seeds is None else seeds[k]))
    finally:
        if sampler is not None:
            sampler.close()
    return out
