"""Context distillation on this machine: held-out KL(teacher with the HHH prompt ‖ student
without it) before and after, and time per 1,000 sequences for the teacher cache and
for training. Prints numbers; not a pass/fail test.

    .venv/bin/python bench/bench_distill.py                  # SmolLM2-135M, the shipped prompt, synthetic HH text
    .venv/bin/python bench/bench_distill.py --model tiny     # the tiny random model (seconds)

Training time per 1,000 sequences is the steady state seen by the driver: the
steps after the first, over the wall time between the first and the last step
(worker start-up, model load, teacher cache and first-step warm-up excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PRESETS = {
    "tiny": {"config": "configs/tiny.yaml", "texts": 480, "batch_size": 16, "lr": 1e-3, "max_prompt_tokens": 256},
    "smollm2": {"config": None, "texts": 200, "batch_size": 8, "lr": 5e-5, "max_prompt_tokens": 0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=sorted(PRESETS))
    ap.add_argument("--texts", type=int, default=0, help="corpus texts (10%% held out)")
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--top-k", type=int, default=50)
    args = ap.parse_args()

    from hh_ray.config import load_config
    from hh_ray.tracking import read_metrics
    from learners.distill_learner import train_policy_init

    p = PRESETS[args.model]
    cfg = load_config(p["config"], {
        "model.policy": args.model, "model.max_seq_len": 128, "data.eval_fraction": 0.1,
        "distill.corpus": "synthetic", "distill.num_texts": args.texts or p["texts"],
        "distill.batch_size": args.batch_size or p["batch_size"], "distill.lr": args.lr or p["lr"],
        "distill.num_workers": args.workers, "distill.top_k": args.top_k, "distill.eval_texts": 0,
        "distill.max_prompt_tokens": p["max_prompt_tokens"], "distill.checkpoint_every": 10**6,
        "tracking.wandb": "disabled"})
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as out:
        t0 = time.perf_counter()
        train_policy_init(cfg, out, "distill")
        wall = time.perf_counter() - t0
        data = read_metrics(out, "distill_data")[0]
        teacher = read_metrics(out, "distill_teacher")[0]
        evals = {r["when"]: r for r in read_metrics(out, "distill_eval")}
        steps = read_metrics(out, "distill")
        span = steps[-1]["time"] - steps[0]["time"]
        trained = sum(r["batch_sequences"] for r in steps[1:])
        train_tokens = sum(r["tokens"] for r in steps[1:])
        print(f"{args.model} fp32, {args.workers} Ray Train worker(s) x 1 CPU, prompt {data['prompt_tokens']} tokens, "
              f"top-k {args.top_k}; {data['train_sequences']} training / {data['held_out_sequences']} held-out "
              f"synthetic HH texts ({teacher['tokens'] / teacher['sequences']:.0f} tokens mean), "
              f"batch {cfg.distill.batch_size}, lr {cfg.distill.lr:g}, {len(steps)} steps; load average {load0:.1f}")
        print(f"held-out KL(teacher+prompt || student), top-{args.top_k}+rest, per token: "
              f"before {evals['before']['heldout_kl']:.4g}  after {evals['after']['heldout_kl']:.4g}  "
              f"({evals['after']['heldout_kl'] / evals['before']['heldout_kl']:.2f}x)")
        print(f"teacher cache (prompt KV once, {teacher['sequences']} sequences): "
              f"{teacher['seconds_per_1000_sequences']:.1f} s per 1,000 sequences")
        print(f"training (steady state, {trained} sequences, {train_tokens} tokens in {span:.1f} s): "
              f"{span / max(trained, 1) * 1000:.1f} s per 1,000 sequences, {train_tokens / span:.0f} tokens/s")
        print(f"whole command {wall:.1f} s; load average at the end {os.getloadavg()[0]:.1f}")
        print(json.dumps({"heldout_kl_before": evals["before"]["heldout_kl"],
                          "heldout_kl_after": evals["after"]["heldout_kl"],
                          "teacher_s_per_1000": teacher["seconds_per_1000_sequences"],
                          "train_s_per_1000": span / max(trained, 1) * 1000, "wall_s": wall}))


if __name__ == "__main__":
    main()
