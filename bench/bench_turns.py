"""Where do rollouts end? SmolLM2-135M-Instruct with the demo's sampling settings, three ways, side by side:

  before  the raw HH prompt, vLLM stopping only at EOS or the token cap (what PPO did before
          the conversation format: responses ran on into made-up turns);
  hh      the raw HH prompt, the turn ending at the next "\\n\\nHuman:" or "\\n\\nAssistant:" (cut) or EOS;
  chat    the tokenizer's chat template, the turn ending at its end-of-turn token (kept).

For each: the fraction of responses that ended by themselves (`ended_fraction`), the mean
length in tokens, and how many responses hold a made-up next turn (an HH "Human:" or
"Assistant:" marker, or a chat-template turn opener). One vLLM engine in this process, no Ray.

    HH_RAY_CACHE=/tmp/hhcache .venv/bin/python bench/bench_turns.py [--prompts 64] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from actors.vllm_engine import make_llm, sampling_params  # noqa: E402
from hh_ray.config import GenerationConfig  # noqa: E402
from hh_ray.conversation import end_of_turn_token_ids, prompt_token_ids, stop_strings  # noqa: E402
from hh_ray.data import prompts_of, synthetic_comparisons  # noqa: E402
from hh_ray.models import resolve_model  # noqa: E402
from hh_ray.rollout import tokens_before_stop  # noqa: E402
from hh_ray.runtime import processor_name, set_torch_threads  # noqa: E402

MADE_UP = ("Human:", "Assistant:", "<|im_start|>")


def run(llm, tok, prompts, mode: str, max_new: int, seed: int) -> dict:
    fmt = "chat" if mode == "chat" else "hh"
    stops = stop_strings(fmt) if mode != "before" else []
    ids = prompt_token_ids(prompts, tok, fmt)
    params = [sampling_params(max_new, 1.0, 1.0, seed=seed + i, logprobs=False, stop=stops,
                              stop_token_ids=end_of_turn_token_ids(tok, fmt) if mode != "before" else None)
              for i in range(len(ids))]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    dt = time.perf_counter() - t0
    lengths, ended, made_up = [], 0, 0
    for out in outs:
        c = out.outputs[0]
        kept = list(c.token_ids)
        if c.stop_reason in stops:
            kept = kept[: tokens_before_stop(kept, c.text, lambda x: tok.decode(x, skip_special_tokens=True))]
        lengths.append(len(kept))
        ended += c.finish_reason == "stop"
        text = tok.decode(kept, skip_special_tokens=False)
        if any(m in text for m in MADE_UP):
            made_up += 1
            if os.environ.get("SHOW_MADE_UP"):
                print(f"  [{mode}] {text!r}")
    return {"mode": mode, "ended_fraction": ended / len(outs), "mean_length": sum(lengths) / len(lengths),
            "made_up_turns": made_up, "responses": len(outs), "seconds": dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48, help="the demo's generation.max_new_tokens")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    set_torch_threads(args.cpus)
    path = resolve_model("smollm2", os.environ.get("HH_RAY_CACHE", ""))
    llm = make_llm(path, GenerationConfig(kv_cache_gib=0.5, cpus_per_worker=args.cpus), 192 + args.max_new_tokens)
    tok = llm.get_tokenizer()
    prompts = prompts_of(synthetic_comparisons(600, seed=args.seed))[: args.prompts]
    print(f"processor: {processor_name()}; SmolLM2-135M-Instruct; {len(prompts)} synthetic "
          f"prompts; max_new_tokens {args.max_new_tokens}; temperature 1.0")
    print(f"{'mode':>7} {'ended_fraction':>15} {'mean length':>12} {'made-up turns':>14} {'seconds':>8}")
    for mode in ("before", "hh", "chat"):
        r = run(llm, tok, prompts, mode, args.max_new_tokens, args.seed)
        print(f"{r['mode']:>7} {r['ended_fraction']:>15.2f} {r['mean_length']:>12.1f} "
              f"{r['made_up_turns']:>7} of {r['responses']:<4} {r['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
