"""The prepared GPU check: run it on a machine with one CUDA GPU and this repo installed
(`make install`, which picks the CUDA vLLM), in under 10 minutes:

1. the tiny PPO job with `weight_sync: broadcast`, learners, generators and the PM service
   sharing the one GPU (fractions of it; the weights then travel over gloo, since NCCL
   refuses two ranks on one device), reward before/after and the placement row;
2. a few SmolLM2-135M PPO iterations (bf16 autocast via `auto`): weight-sync seconds,
   samples/s, peak GPU memory (nvidia-smi, sampled);
3. the serve tests (tests/test_serve.py) on the GPU.

    .venv/bin/python bench/gpu_check.py [--out bench/gpu_check.json] [--smollm2-iterations 4]

Writes the numbers as JSON and prints them; record them in bench/RESULTS.md. `--allow-cpu`
runs the same steps on a CPU (a dry run of the script itself, slow).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# One GPU for everything: each part takes a share (Ray's fractional GPUs), vLLM a small
# memory fraction so that the learners' models fit beside it.
ONE_GPU = {"generation.num_gpus": 0.3, "generation.gpu_memory_utilization": 0.25, "ppo.pm_service_gpus": 0.2,
           "ppo.gpus_per_learner": 0.5, "model.dtype": "bfloat16"}


class GpuMemory:
    """Peak used memory of GPU 0 (all processes), sampled by nvidia-smi every 0.5 s."""

    def __init__(self):
        self.peak_mib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=10).stdout
                self.peak_mib = max(self.peak_mib, int(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass

    def stop(self) -> int:
        self._stop.set()
        return self.peak_mib


def step(name: str, results: dict, fn) -> None:
    t0 = time.time()
    print(f"\n== {name}", flush=True)
    try:
        results[name] = {"ok": True, **fn()}
    except Exception as e:  # noqa: BLE001 - the check reports every step, failed or not
        results[name] = {"ok": False, "error": repr(e)[:2000]}
    results[name]["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(results[name], indent=1), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "gpu_check.json"))
    ap.add_argument("--smollm2-iterations", type=int, default=4)
    ap.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a dry run of this script)")
    args = ap.parse_args()

    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.allow_cpu:
        print("no CUDA GPU here; pass --allow-cpu for a dry run on the CPU", file=sys.stderr)
        return 2
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hh_ray.config import load_config
    from hh_ray.models import load_scalar_head_model, resolve_model, save_model
    from hh_ray.orchestration.cluster import ensure_ray
    from hh_ray.orchestration.controller import train_ppo
    from hh_ray.tracking import read_metrics
    from learners.pm_learner import train_pm

    gpu = ONE_GPU if on_gpu else {}
    results = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu (dry run)",
               "torch": torch.__version__, "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                                      capture_output=True, text=True).stdout.strip()}
    ensure_ray()
    work = Path(tempfile.mkdtemp(prefix="hh-gpu-check-"))

    def tiny():
        pm = train_pm(load_config(ROOT / "configs" / "tiny.yaml", {"tracking.wandb": "offline"}), work / "tiny-pm")
        cfg = load_config(ROOT / "configs" / "tiny.yaml", {
            **gpu, "model.pm": str(pm), "generation.weight_sync": "broadcast", "ppo.iterations": 6,
            "ppo.lr": 0.002, "ppo.epochs": 2, "ppo.rollout_batch_size": 32, "ppo.minibatch_size": 16,
            "tracking.wandb": "offline"})
        out = train_ppo(cfg, work / "tiny-ppo")
        rows = read_metrics(work / "tiny-ppo", "ppo")
        return {"reward_before": out["reward_pm_heldout_before"], "reward_after": out["reward_pm_heldout_after"],
                "time_sync_s": [round(r["time_sync"], 3) for r in rows],
                "placement": read_metrics(work / "tiny-ppo", "placement")[-1]}

    def smollm2():
        path = resolve_model("smollm2")
        model, tok = load_scalar_head_model(path)  # an untrained PM: the numbers here are speed, not reward
        pm = save_model(model, tok, work / "smollm2-pm")
        memory = GpuMemory() if on_gpu else None
        cfg = load_config(ROOT / "configs" / "demo.yaml", {
            **gpu, "model.pm": str(pm), "generation.weight_sync": "broadcast", "ppo.autocast": "auto",
            "ppo.iterations": args.smollm2_iterations, "ppo.eval_prompts": 8, "tracking.wandb": "offline"})
        train_ppo(cfg, work / "smollm2-ppo")
        rows = read_metrics(work / "smollm2-ppo", "ppo")[1:] or read_metrics(work / "smollm2-ppo", "ppo")
        mean = lambda k: round(sum(r[k] for r in rows) / len(rows), 3)  # noqa: E731
        return {"iterations": len(rows) + 1, "samples_per_s": mean("samples_per_s"), "time_sync_s": mean("time_sync"),
                "time_generate_s": mean("time_generate"), "time_learn_s": mean("time_learn"),
                "sync_mib": round(rows[-1].get("sync_bytes", 0) / 2**20, 1),
                "peak_gpu_memory_mib": memory.stop() if memory else None}

    def serve():
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", str(ROOT / "tests" / "test_serve.py")],
                             cwd=ROOT, capture_output=True, text=True, timeout=480)
        return {"returncode": run.returncode, "tail": run.stdout[-1500:]}

    step("tiny_ppo_broadcast", results, tiny)
    step("smollm2_ppo", results, smollm2)
    import ray

    ray.shutdown()  # the serve tests start their own cluster
    step("serve_tests", results, serve)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nwritten to {args.out}")
    return 0 if all(v.get("ok") for v in results.values() if isinstance(v, dict) and "ok" in v) else 1


if __name__ == "__main__":
    sys.exit(main())
