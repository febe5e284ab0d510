"""What one decode step costs on this machine, against what bounds it, side by side:

- vLLM (the generation worker's engine settings, actors/vllm_engine.py) at 1..32 rows: every
  request decodes exactly --new tokens (min_tokens), so each step has all its rows;
- a bare forward of the same 16-row batch: the HF model with its KV cache, one token per step;
- reading the weights once (a sum over as many floats as the model has parameters): a decode
  step reads every weight, whatever its rows.

    .venv/bin/python bench/bench_decode.py [--model smollm2] [--rows 1,4,8,16,32] [--new 64] [--dtype float32]

Prints numbers; it is not a pass/fail test. Runs in this process on all its cores (2 threads here).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PROMPT_TOKENS = 40


def prompts(rows: int) -> list[list[int]]:
    return [list(range(100 + i, 100 + i + PROMPT_TOKENS)) for i in range(rows)]


def vllm_ms_per_step(llm, rows: int, new: int, repeats: int = 3) -> float:
    from actors.vllm_engine import sampling_params

    params = [sampling_params(new, seed=i, min_tokens=new) for i in range(rows)]
    batch = [{"prompt_token_ids": p} for p in prompts(rows)]
    llm.generate(batch, params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / new


def bare_ms_per_step(model, rows: int, new: int, repeats: int = 3) -> float:
    import torch

    ids = torch.tensor(prompts(rows))
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            out = model(ids, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].softmax(-1).multinomial(1)
            t0 = time.perf_counter()
            for _ in range(new - 1):
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1].softmax(-1).multinomial(1)
            times.append((time.perf_counter() - t0) / (new - 1))
    return 1000 * statistics.median(times[1:])


def weight_read_ms(numel: int, dtype: str, repeats: int = 5) -> float:
    import torch

    w = torch.ones(numel, dtype=getattr(torch, dtype))
    w.sum()
    t0 = time.perf_counter()
    for _ in range(repeats):
        w.sum()
    return 1000 * (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rows", default="1,4,8,16,32")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--dtype", default="float32", help="vLLM's and the bare forward's weights")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from actors.vllm_engine import engine_kwargs
    from hh_ray.config import GenerationConfig
    from hh_ray.models import resolve_model
    from hh_ray.runtime import processor_name
    from vllm import LLM

    path = resolve_model(args.model)
    torch.set_num_threads(os.cpu_count() or 1)  # before the engine: vLLM makes it a no-op after
    kw = engine_kwargs(path, GenerationConfig(kv_cache_gib=1.0), PROMPT_TOKENS + args.new + 8, seed=0)
    llm = LLM(**{**kw, "dtype": args.dtype})
    rows = [int(r) for r in args.rows.split(",")]
    vllm_ms = {r: vllm_ms_per_step(llm, r, args.new) for r in rows}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    numel = sum(p.numel() for p in model.parameters())
    bare = bare_ms_per_step(model, 16, args.new)
    read = weight_read_ms(numel, args.dtype)

    print(f"\n{args.model} ({numel / 1e6:.0f}M parameters, {args.dtype}), {PROMPT_TOKENS}-token prompts, "
          f"{args.new} new tokens each, {torch.get_num_threads()} threads, {processor_name()}")
    print(f"{'rows per step':<28}" + "".join(f"{r:>9}" for r in rows))
    print(f"{'vLLM ms per step':<28}" + "".join(f"{vllm_ms[r]:>9.1f}" for r in rows))
    print(f"{'vLLM tokens/s':<28}" + "".join(f"{1000 * r / vllm_ms[r]:>9.0f}" for r in rows))
    if 16 in vllm_ms:
        print(f"bare HF forward, 16 rows: {bare:.1f} ms per step ({16000 / bare:.0f} tokens/s), "
              f"vLLM {bare / vllm_ms[16]:.1f}x faster")
    else:
        print(f"bare HF forward, 16 rows: {bare:.1f} ms per step ({16000 / bare:.0f} tokens/s)")
    size = numel * torch.finfo(getattr(torch, args.dtype)).bits / 8
    print(f"reading the weights once ({size / 1e6:.0f} MB): {read:.1f} ms ({size / read / 1e6:.1f} GB/s)")


if __name__ == "__main__":
    main()
