"""Serving numbers on SmolLM2-135M: the Serve app on 127.0.0.1, driven over HTTP
by the official `openai` async client at 1, 4 and 16 concurrent clients, plain
sampling vs best-of-4 with a PM.

    HH_RAY_CACHE=/tmp/hhcache .venv/bin/python bench/bench_serve.py [--requests 8] [--max-tokens 64]

Per level: latency p50/p95 of whole requests (the engine is the batch
`LLM.generate`, so time to first token ~ latency), and generated tokens/s
over the level's wall time. For best-of-4, "generated" counts every
candidate (the compute spent); "~returned" is that over 4, the rate of
responses a user receives.
The PM is SmolLM2 with an untrained scalar head: ranking costs the same as
with a trained one. Prints numbers; it is not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUESTIONS = ["How do I bake bread at home?", "What is a good way to learn to swim?",
             "Can you explain how vaccines work?", "How should I prepare for a job interview?",
             "What are some tips for saving money?", "How do plants make food?",
             "Why is the sky blue?", "How can I sleep better?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def untrained_pm(policy: str) -> str:
    """A PM on the policy's backbone that scores conversations in the format the policy is served in."""
    from hh_ray.conversation import model_format
    from hh_ray.models import cache_root, load_scalar_head_model, load_tokenizer, save_model

    fmt = model_format(policy, "auto", load_tokenizer(policy))
    out = cache_root() / f"smollm2-135m-pm-untrained-{fmt}"
    if not (out / "config.json").exists():
        model, tok = load_scalar_head_model(policy)
        save_model(model, tok, out, conversation_format=fmt)
    return str(out)


async def level(client, model: str, concurrency: int, total: int, best_of: int, max_tokens: int) -> dict:
    latencies, generated = [], 0
    todo = list(range(total))

    async def worker():
        nonlocal generated
        while todo:
            i = todo.pop()
            t0 = time.perf_counter()
            r = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                max_tokens=max_tokens, temperature=1.0, seed=i, extra_body={"best_of": best_of})
            latencies.append(time.perf_counter() - t0)
            generated += r.usage.completion_tokens
    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(p):
        return lat[min(len(lat) - 1, round(p * (len(lat) - 1)))]

    return {"clients": concurrency, "best_of": best_of, "requests": total, "p50_s": pct(0.5), "p95_s": pct(0.95),
            "gen_tok_s": generated / wall, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=8, help="requests per level (at least one per client)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--cpus", type=float, default=2, help="CPUs of the replica (vLLM threads)")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    args = ap.parse_args()

    from openai import AsyncOpenAI
    from ray import serve

    from hh_ray.models import resolve_model
    from serve.app import start

    policy = resolve_model("smollm2")
    pm = untrained_pm(policy)
    port = _free_port()
    t0 = time.perf_counter()
    start(dict(policy=policy, pm=pm, best_of_n=1, cpus_per_replica=args.cpus, kv_cache_gib=args.kv_cache_gib,
               max_model_len=2048, max_batch_size=64), port=port)
    print(f"app up in {time.perf_counter() - t0:.1f} s (SmolLM2-135M, vLLM CPU fp32, {args.cpus:g} CPUs, "
          f"KV {args.kv_cache_gib:g} GiB; PM: HF actor, 1 CPU)", flush=True)
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600, max_retries=0)

    async def run():
        model = (await client.models.list()).data[0].id
        await level(client, model, 1, 1, 4, 8)  # warm-up: engine and PM paths both
        rows = []
        for best_of in (1, 4):
            for c in args.levels:
                r = await level(client, model, c, max(c, args.requests), best_of, args.max_tokens)
                rows.append(r)
                print(f"best_of={best_of} clients={c:>2} requests={r['requests']:>2}  p50 {r['p50_s']:6.2f} s  "
                      f"p95 {r['p95_s']:6.2f} s  generated {r['gen_tok_s']:6.1f} tok/s  "
                      f"~returned {r['gen_tok_s'] / best_of:6.1f} tok/s  (wall {r['wall_s']:.1f} s)", flush=True)
        return rows

    try:
        asyncio.run(run())
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
