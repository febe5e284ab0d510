"""PM throughput on this machine: training pairs/s with 1 vs 2 Ray Train learner
workers, and scoring pairs/s. Prints numbers; not a pass/fail test.

    .venv/bin/python bench/bench_pm.py                   # tiny random model, synthetic pairs
    .venv/bin/python bench/bench_pm.py --model smollm2   # SmolLM2-135M backbone

Training throughput is the steady state seen by the driver: pairs trained
between the second and the last step, over the wall time between them (worker
start-up, model load and the first step's warm-up excluded; reported apart).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PRESETS = {
    "tiny": {"config": "configs/tiny.yaml", "pairs": 640, "batch_size": 32, "max_len": 128, "lr": 1e-3},
    "smollm2": {"config": None, "pairs": 96, "batch_size": 8, "max_len": 256, "lr": 1e-5},
}


def bench_training(args, workers: int, out: Path) -> dict:
    from hh_ray.config import load_config
    from hh_ray.tracking import read_metrics
    from learners.pm_learner import train_pm

    p = PRESETS[args.model]
    cfg = load_config(p["config"], {
        "model.policy": args.model, "model.max_seq_len": args.max_len or p["max_len"],
        "data.source": "synthetic", "data.num_synthetic": args.pairs or p["pairs"], "data.eval_fraction": 0.05,
        "pm.batch_size": args.batch_size or p["batch_size"], "pm.lr": p["lr"], "pm.num_workers": workers,
        "pm.checkpoint_every": 10**6, "tracking.wandb": "disabled"})
    t0 = time.perf_counter()
    train_pm(cfg, out)
    wall = time.perf_counter() - t0
    rows = read_metrics(out, "pm_finetune")
    steady = rows[1:]
    span = steady[-1]["time"] - rows[0]["time"]
    return {"workers": workers, "steps": len(rows), "pairs": rows[-1]["examples_seen"],
            "pairs_per_s": sum(r["batch_pairs"] for r in steady) / span if span > 0 else float("nan"),
            "worker_pairs_per_s_median": statistics.median(r["examples_per_s"] for r in steady),
            "wall_s": wall}


def bench_scoring(args) -> dict:
    import torch

    from hh_ray.data import synthetic_comparisons
    from hh_ray.models import load_scalar_head_model, resolve_model
    from hh_ray.pm_eval import score_comparisons

    p = PRESETS[args.model]
    max_len = args.max_len or p["max_len"]
    model, tok = load_scalar_head_model(resolve_model(args.model))
    pairs = synthetic_comparisons(args.pairs or p["pairs"], seed=1)
    score_comparisons(model, tok, pairs[:16], max_len, batch_size=16)  # warm-up
    t0 = time.perf_counter()
    score_comparisons(model, tok, pairs, max_len, batch_size=16)
    dt = time.perf_counter() - t0
    return {"pairs": len(pairs), "threads": torch.get_num_threads(), "pairs_per_s": len(pairs) / dt,
            "s_per_1000_pairs": dt / len(pairs) * 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--pairs", type=int, default=0, help="synthetic pairs (default per model)")
    ap.add_argument("--batch-size", type=int, default=0, help="pairs per optimizer step (default per model)")
    ap.add_argument("--max-len", type=int, default=0, help="tokens per transcript (default per model)")
    ap.add_argument("--workers", default="1,2", help="learner worker counts to compare")
    args = ap.parse_args()

    from hh_ray.orchestration.cluster import ensure_ray

    ensure_ray()
    print(f"PM benchmark, model={args.model}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        for w in (int(x) for x in args.workers.split(",")):
            r = bench_training(args, w, Path(tmp) / f"w{w}")
            print(f"train  workers={r['workers']}  {r['pairs_per_s']:8.1f} pairs/s steady "
                  f"(median per-step on rank 0: {r['worker_pairs_per_s_median']:.1f}; "
                  f"{r['pairs']} pairs in {r['steps']} steps, {r['wall_s']:.0f} s wall incl. start-up and eval)")
    import torch

    # 1 thread is what a 1-CPU Ray actor gets; all cores is torch's default,
    # which collapses when other processes load the machine.
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        s = bench_scoring(args)
        print(f"score  {s['pairs_per_s']:8.1f} pairs/s  ({s['s_per_1000_pairs']:.1f} s per 1,000 pairs, "
              f"{s['threads']} thread(s), batch 16, {s['pairs']} pairs)")
    print(f"load average during the run: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
