"""Building a vLLM engine the way that works here (docs/architecture.md), for rollouts and serving.

The generation actors (actors/generation.py) and the serving replicas (serve/)
both call `make_llm` and `sampling_params`.

On CPU the engine must run in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): the
multiprocess engine pins cores and cannot take tensors through
`collective_rpc`, which in-place weight reload needs. It is set here, when this
module is imported, so that it is in the environment before any engine of
this process is built; `setdefault` leaves an explicit choice alone. On GPU the
in-process engine is kept too: `reload_weights` then takes the tensors directly.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from hh_ray.config import GenerationConfig  # noqa: E402
from hh_ray.runtime import device, set_torch_threads  # noqa: E402


class EngineError(ValueError):
    pass


def on_gpu() -> bool:
    return device().type == "cuda"


def engine_kwargs(model_path: str, gen_cfg: GenerationConfig, max_model_len: int,
                  dtype: str = "float32", seed: int = 0, runner: str = "generate") -> dict:
    """Keyword arguments of `vllm.LLM` for one engine.

    - CPU: float32 (the CPU kernels and our HF learners agree in fp32; bf16
      weights decode faster where bf16 is fast but move the behaviour log-probs,
      and the KL read from them, away from the fp32 reference: bench/RESULTS.md),
      eager mode (no graph capture to amortise), and an explicit KV-cache size:
      `gpu_memory_utilization` would mean a fraction of a NUMA node's RAM.
    - GPU: the model's dtype, CUDA graphs, `generation.gpu_memory_utilization`,
      tensor parallelism.
    - Both: `processed_logprobs`, so a behaviour log-prob is that of the
      distribution actually sampled (after temperature / top-p), the one the
      PPO ratio needs; vLLM's default is the raw, temperature-unscaled one.
    """
    kw = dict(model=model_path, tokenizer=model_path, seed=seed, max_model_len=max_model_len,
              tensor_parallel_size=gen_cfg.tensor_parallel_size)
    if runner == "generate":
        kw["logprobs_mode"] = "processed_logprobs"
    else:
        kw["runner"] = runner
    if gen_cfg.weight_sync == "broadcast" and runner == "generate":
        from actors.weight_transfer import BACKEND, register

        register()  # in this process; the entry point does it in vLLM's own worker processes
        kw["weight_transfer_config"] = {"backend": BACKEND}
    if on_gpu():
        kw.update(dtype=dtype, gpu_memory_utilization=gen_cfg.gpu_memory_utilization)
    else:
        if gen_cfg.tensor_parallel_size != 1:
            raise EngineError("generation.tensor_parallel_size > 1 needs GPUs; use more workers "
                              "(generation.num_workers) on CPU")
        if gen_cfg.kv_cache_gib <= 0:
            raise EngineError(f"generation.kv_cache_gib must be > 0 on CPU, got {gen_cfg.kv_cache_gib}")
        kw.update(dtype="float32", enforce_eager=True,
                  kv_cache_memory_bytes=int(gen_cfg.kv_cache_gib * 2**30))
    return kw


def make_llm(model_path: str, gen_cfg: GenerationConfig, max_model_len: int,
             dtype: str = "float32", seed: int = 0, runner: str = "generate", **overrides):
    """A `vllm.LLM`; `overrides` win over `engine_kwargs` (e.g. `enable_prefix_caching`)."""
    import gc

    from vllm import LLM

    # The engine runs gc.collect() several times while it starts; each pass would walk every
    # object vLLM's and torch's imports just made (~0.25 s a pass). They live as long as the
    # process, so they are moved out of the collector's sight first.
    gc.freeze()
    if not on_gpu():
        rank_sampled_tokens_eagerly()
    return LLM(**{**engine_kwargs(model_path, gen_cfg, max_model_len, dtype, seed, runner), **overrides})


def count_at_least(x, values):
    """Per row of `x`, how many entries are >= that row's value: the rank vLLM gives a sampled
    token among its logprobs (its `batched_count_greater_than`, computed the same way)."""
    return (x >= values).sum(-1)


def rank_sampled_tokens_eagerly() -> None:
    """vLLM computes each sampled token's rank with a function torch inductor compiles on its
    first call: on CPU a C++ build that every engine's first `generate` waits for (seconds).
    Run eagerly it allocates one bool per logit of the step's rows, which is small beside the
    logits themselves. On a GPU the compiled kernel is kept: its batches are large."""
    import vllm.v1.sample.sampler as sampler

    sampler.batched_count_greater_than = count_at_least


def make_replica_llm(model_path: str, cpus: float, kv_cache_gib: float, max_model_len: int | None, seed: int):
    """A serving replica's engine, its torch threads set from the replica's CPU share first
    (vLLM makes torch.set_num_threads a no-op in its process once an engine exists)."""
    threads = set_torch_threads(cpus)
    return make_llm(model_path, GenerationConfig(kv_cache_gib=kv_cache_gib, cpus_per_worker=threads), max_model_len,
                    seed=seed)


def sampling_params(max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                    seed: int | None = None, logprobs: bool = True, n: int = 1, **extra):
    """One request's sampling settings: stop on EOS, and (by default) the
    sampled token's log-prob at every step (`logprobs=0` means "the sampled
    token only", no top-k alternatives)."""
    from vllm import SamplingParams

    if max_new_tokens < 1:
        raise EngineError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return SamplingParams(n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          seed=seed, logprobs=0 if logprobs else None, **extra)
