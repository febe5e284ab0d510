"""PM throughput on this machine: training pairs/s with 1 vs 2 Ray Train learner
workers, and scoring pairs/s. Prints numbers; not a pass/fail test.

    .venv/bin/python bench/bench_pm.py                   # tiny random model, synthetic pairs
    .venv/bin/python bench/bench_pm.py --model smollm2   # SmolLM2-135M backbone
    .venv/bin/python bench/bench_pm.py --real ../shared/data/hh-rlhf/harmless-base --pairs 160
        # one process, SmolLM2 on real pairs: the two-transcript step (before) against the
        # shared-prefix step, with and without length-grouped batches, fp32 and `auto`;
        # the same pairs, seed and optimizer for each, then held-out accuracy of each

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

from hh_ray.runtime import processor_name  # noqa: E402
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


def bench_real(args) -> None:
    """s/pair of PM training steps on real HH pairs, side by side in one process."""
    import functools
    import random

    import torch

    from hh_ray.data import load_comparisons
    from hh_ray.models import (autocast, encode_for_pm, load_scalar_head_model, packed_values, pm_group_rows,
                               pm_scores, resolve_model, set_attention_for)
    from hh_ray.packing import length_grouped, pack_groups, packed_length
    from hh_ray.pm_eval import accuracy, comparison_groups, pairwise_loss, score_comparisons
    from hh_ray.runtime import resolve_autocast
    from learners.kit import adamw

    torch.set_num_threads(os.cpu_count() or 1)
    max_len, batch, n_train = args.max_len or 256, args.batch_size or 16, args.pairs or 160
    pairs = load_comparisons(args.real, split=args.split, skip_bad=True, skip_identical=True)
    random.Random(0).shuffle(pairs)
    train, held_out = pairs[:n_train], pairs[n_train: n_train + args.held_out]
    path = resolve_model("smollm2")
    _, tok = load_scalar_head_model(path)
    groups = comparison_groups(train, tok, "hh")
    rows = pm_group_rows(tok, groups, max_len)
    lengths = [packed_length(r) for r in rows]
    order = list(range(n_train))
    random.Random(1).shuffle(order)
    auto, why = resolve_autocast("auto")
    print(f"real pairs: {len(train)} train, {len(held_out)} held out from {args.real} ({args.split}); "
          f"max_len {max_len}, batch {batch}; {os.cpu_count()} CPUs ({processor_name()}); auto -> {auto} ({why})")

    def two_transcript(model, ids, mixed):
        texts = [groups[i][0] for i in ids] + [groups[i][1] for i in ids]
        enc = encode_for_pm(tok, texts, max_len)  # each transcript cut on its own, as before
        with mixed():
            s = pm_scores(model, enc["input_ids"], enc["attention_mask"]).float()
        return s[: len(ids)], s[len(ids):], int(enc["attention_mask"].numel())

    def packed(model, ids, mixed):
        b = pack_groups([rows[i] for i in ids], tok.pad_token_id)
        with mixed():
            v = packed_values(model, b).float()
        return v[0::2], v[1::2], int(b.input_ids.numel())

    modes = [("before: two transcripts, shuffled", two_transcript, False, "none"),
             ("packed, shuffled", packed, False, "none"),
             ("packed, length-grouped", packed, True, "none"),
             (f"packed, length-grouped, auto={auto}", packed, True, auto)]
    print(f"{'mode':44} {'s/pair':>7} {'speed-up':>8} {'tokens/pair':>11} {'held-out acc':>12} {'loss':>6}")
    base = None
    for name, step, grouped, mixed_kind in modes:
        torch.manual_seed(0)
        model, _ = load_scalar_head_model(path)
        set_attention_for([model], mixed_kind, "cpu")
        mixed = functools.partial(autocast, mixed_kind, "cpu")
        opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        seq = length_grouped(order, lengths, batch, "bench") if grouped else order
        model.train()
        seconds, tokens, losses = 0.0, 0, []
        for k in range(0, n_train - batch + 1, batch):
            ids = seq[k: k + batch]
            t0 = time.perf_counter()
            r_c, r_r, width = step(model, ids, mixed)
            loss = pairwise_loss(r_c, r_r)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - t0
            tokens += width
            losses.append(loss.item())
        trained = (n_train // batch) * batch
        acc = accuracy(*score_comparisons(model, tok, held_out, max_len)) if held_out else float("nan")
        base = base or seconds / trained
        print(f"{name:44} {seconds / trained:7.3f} {base / (seconds / trained):7.2f}x {tokens / trained:11.0f} "
              f"{acc:12.3f} {statistics.mean(losses):6.3f}", flush=True)
    print(f"load average during the run: {os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--pairs", type=int, default=0, help="synthetic pairs (default per model)")
    ap.add_argument("--batch-size", type=int, default=0, help="pairs per optimizer step (default per model)")
    ap.add_argument("--max-len", type=int, default=0, help="tokens per transcript (default per model)")
    ap.add_argument("--workers", default="1,2", help="learner worker counts to compare")
    ap.add_argument("--real", default="", help="folder/file of real HH pairs: the in-process step comparison")
    ap.add_argument("--split", default="test", help="split of --real to read")
    ap.add_argument("--held-out", type=int, default=200, help="held-out pairs scored after each --real mode")
    args = ap.parse_args()
    if args.real:
        bench_real(args)
        return

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
