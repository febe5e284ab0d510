"""Weight sync of SmolLM2-135M into live vLLM engines, side by side in one run:

- object store: the learner's state dict put as one ObjectRef, each engine fetches it and
  reloads it in place (`generation.weight_sync: object_store`);
- broadcast: rank 0 (here this process, as learner rank 0 is in a run) and the engines in
  one gloo group, the weights broadcast in buckets straight into vLLM's weight-transfer
  engine (`generation.weight_sync: broadcast`);
- raw copy: the same bytes copied once in this process, into preallocated tensors (the floor).

    HH_RAY_CACHE=/tmp/hhcache .venv/bin/python bench/bench_weight_sync.py [--workers 2] [--reps 5]

Prints medians over --reps syncs after one warm-up each; not a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hh_ray.runtime import processor_name  # noqa: E402


def median_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=1, help="generation engines receiving the weights")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bucket-mb", type=int, default=64)
    args = ap.parse_args()

    import ray
    import torch

    from actors.generation import GenerationPool
    from hh_ray.config import GenerationConfig
    from hh_ray.models import load_policy, resolve_model
    from hh_ray.weights import weights_for_sync
    from learners.weight_sync import WeightBroadcaster

    path = resolve_model("smollm2")
    model = load_policy(path).eval()
    state = model.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in state.values()}.values())
    print(f"SmolLM2-135M fp32, {nbytes / 2**20:.0f} MiB of distinct tensors, {args.workers} engine(s), "
          f"{os.cpu_count()} CPUs ({processor_name()}); load average {os.getloadavg()[0]:.1f}")
    ray.init(num_cpus=max(4, args.workers + 2), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HH_RAY_CACHE": os.environ.get("HH_RAY_CACHE", "")}})
    cfg = GenerationConfig(num_workers=args.workers, cpus_per_worker=1, kv_cache_gib=0.5, weight_sync="broadcast")
    pool = GenerationPool(path, cfg, 512)
    version = iter(range(1, 10_000))

    def object_store():
        pool.update_weights(next(version), ray.put(weights_for_sync(model)))

    sender = WeightBroadcaster(torch.device("cpu"), bucket_bytes=args.bucket_mb << 20)

    def broadcast():
        out = sender.send(state, next(version), pool.workers)
        assert len(set(out["versions"])) == 1

    targets = {k: torch.empty_like(v) for k, v in state.items()}

    def raw_copy():
        for k, v in state.items():
            targets[k].copy_(v)

    rows = [("raw in-process copy", median_seconds(raw_copy, args.reps)),
            ("object store + reload", median_seconds(object_store, args.reps)),
            (f"broadcast, {args.bucket_mb} MiB buckets", median_seconds(broadcast, args.reps))]
    raw = rows[0][1]
    print(f"\n{'weight sync':<32} {'seconds':>8} {'GB/s':>6} {'x raw':>6}")
    for name, s in rows:
        print(f"{name:<32} {s:>8.3f} {nbytes / s / 1e9:>6.2f} {s / raw:>6.2f}")
    print(f"(first broadcast also formed the group: {sender.connect(pool.workers):.2f} s to form it again)")
    pool.shutdown()


if __name__ == "__main__":
    main()
