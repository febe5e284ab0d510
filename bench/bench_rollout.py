"""Rollout-side numbers on SmolLM2-135M, one run, side by side:

- generation tokens/s: one vLLM GenerationWorker actor vs HF `generate` in
  this process, same prompts, same CPU count, same sampling settings;
- PM scoring pairs/s through the PMScorer actor;
- weight sync: seconds to publish the 135M state dict and load it into the
  live engine, vs a plain in-process copy of the same bytes (the ratio is the
  overhead of going through the object store and vLLM's reload).

    HH_RAY_CACHE=/tmp/hhcache .venv/bin/python bench/bench_rollout.py [--prompts 32] [--new 64]

Prints numbers; it is not a pass/fail test. Tokens are counted up to and
including each response's EOS (what RL trains on), so both sides count the
same kind of token even though sampled lengths differ.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new", type=int, default=64, help="max new tokens per response")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs for the vLLM actor and for HF generate")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    args = ap.parse_args()

    import ray
    import torch

    from actors.generation import GenerationPool, weights_for_sync
    from actors.pm_service import start_pm_scorer
    from hh_ray.config import GenerationConfig
    from hh_ray.data import prompts_of, synthetic_comparisons
    from hh_ray.models import load_policy, load_scalar_head_model, load_tokenizer, resolve_model, save_model

    model_path = resolve_model("smollm2")
    tok = load_tokenizer(model_path)
    texts = prompts_of(synthetic_comparisons(2 * args.prompts, seed=11))[: args.prompts]
    prompt_ids = [tok(t, add_special_tokens=False)["input_ids"][-256:] for t in texts]
    n_prompt_tokens = sum(map(len, prompt_ids))
    print(f"SmolLM2-135M fp32, {len(texts)} prompts ({n_prompt_tokens / len(texts):.0f} tokens mean), "
          f"<= {args.new} new tokens, T=1.0, {args.cpus} CPUs each side; load average {os.getloadavg()[0]:.1f}")

    ray.init(num_cpus=max(4, args.cpus + 2), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HH_RAY_CACHE": os.environ.get("HH_RAY_CACHE", ""),
                                       "TOKENIZERS_PARALLELISM": "false"}})
    results = []

    # ---------------------------------------------------------------- generation
    gen_cfg = GenerationConfig(num_workers=1, cpus_per_worker=args.cpus, max_new_tokens=args.new,
                               kv_cache_gib=args.kv_cache_gib)
    t0 = time.perf_counter()
    pool = GenerationPool(model_path, gen_cfg, max_model_len=512)
    print(f"vLLM actor start: {time.perf_counter() - t0:.1f} s")
    pool.generate(prompt_ids[:2], max_new_tokens=4)  # warm-up
    t0 = time.perf_counter()
    batch = pool.generate(prompt_ids, texts, temperature=1.0, seed=0)
    dt = time.perf_counter() - t0
    n = int(batch.response_lengths.sum())
    results.append(("generation, vLLM actor", f"{n / dt:.0f} tok/s", f"{n} tokens in {dt:.1f} s"))

    torch.set_num_threads(args.cpus)
    policy = load_policy(model_path).eval()
    tok.padding_side = "left"
    enc = tok.pad({"input_ids": prompt_ids}, return_tensors="pt")
    with torch.no_grad():
        policy.generate(**{k: v[:2] for k, v in enc.items()}, max_new_tokens=4, do_sample=True)  # warm-up
        t0 = time.perf_counter()
        out = policy.generate(**enc, max_new_tokens=args.new, do_sample=True, temperature=1.0, top_p=1.0,
                              top_k=0, pad_token_id=tok.pad_token_id)
        dt = time.perf_counter() - t0
    gen = out[:, enc["input_ids"].shape[1]:]
    eos = (gen == tok.eos_token_id).int()
    # tokens up to and including the first EOS; the rest is padding HF still computed
    lengths = torch.where(eos.any(1), eos.argmax(1) + 1, torch.full_like(eos[:, 0], gen.shape[1]))
    n_hf = int(lengths.sum())
    results.append(("generation, HF generate", f"{n_hf / dt:.0f} tok/s", f"{n_hf} tokens in {dt:.1f} s"))
    del policy

    # ---------------------------------------------------------------- PM scoring
    pm_model, pm_tok = load_scalar_head_model(model_path)
    pm_dir = save_model(pm_model, pm_tok, Path(os.environ.get("HH_RAY_CACHE", "/tmp")) / "bench-pm-smollm2")
    del pm_model
    pm = start_pm_scorer(str(pm_dir), max_len=512, num_cpus=args.cpus)
    ray.get(pm.score.remote(batch.prompts[:2], batch.responses[:2]))  # warm-up
    t0 = time.perf_counter()
    # 4 callers at once, as several generation chunks would arrive: the service batches them
    k = len(batch) // 4
    ray.get([pm.score.remote(batch.prompts[i: i + k], batch.responses[i: i + k]) for i in range(0, len(batch), k)])
    dt = time.perf_counter() - t0
    results.append(("PM scoring (hf)", f"{len(batch) / dt:.1f} pairs/s",
                    f"{len(batch)} pairs of ~{(n_prompt_tokens + n) / len(batch):.0f} tokens in {dt:.1f} s"))
    ray.kill(pm)

    # ---------------------------------------------------------------- weight sync
    state = weights_for_sync(load_policy(model_path))
    nbytes = sum(t.nbytes for t in state.values())
    perturbed = {k: v + 1e-3 for k, v in state.items()}
    t0 = time.perf_counter()
    ref = ray.put(perturbed)
    t_put = time.perf_counter() - t0
    t_update = pool.update_weights(1, ref)
    assert pool.versions() == [1]
    dst = {k: torch.empty_like(v) for k, v in state.items()}
    t0 = time.perf_counter()
    for k, v in perturbed.items():
        dst[k].copy_(v)
    t_copy = time.perf_counter() - t0
    total = t_put + t_update
    results.append(("weight sync, object store + reload", f"{total:.2f} s",
                    f"{nbytes / 2**20:.0f} MiB: ray.put {t_put:.2f} s + fetch/check/reload_weights {t_update:.2f} s"))
    results.append(("in-process copy of the same bytes", f"{t_copy:.3f} s", f"overhead x{total / t_copy:.0f}"))
    batch = pool.generate(prompt_ids[:4], max_new_tokens=8)
    assert batch.policy_version.tolist() == [1] * 4
    pool.shutdown()

    width = max(len(r[0]) for r in results)
    print()
    for name, value, detail in results:
        print(f"{name:<{width}}  {value:>14}  {detail}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
