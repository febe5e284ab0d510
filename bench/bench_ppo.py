"""One RLHF iteration on SmolLM2-135M in several settings, side by side.

    .venv/bin/python bench/bench_ppo.py [--iterations 3] [--prompts 16] [--new-tokens 64] [--modes sync,async]

Modes: sync, async, sync-fp32 (sync without autocast), fp32 (the learner settings of before), and the estimators / LoRA on the
same workload of --prompts sequences: ppo-lora (PPO + critic, LoRA r=16), grpo and rloo (4
samples per prompt: --prompts/4 prompts x 4, no critic), grpo-lora and rloo-lora; the learners'
allocator (hh_ray.runtime.worker_env): sync-jemalloc (bf16 learners on jemalloc) and sync-fp32-glibc
(fp32 learners on glibc); sync-mb4 (micro-batches of 4); sync-no-recompute and sync-fp32-no-recompute
(model.gradient_checkpointing none: every activation kept, against the default's selective recompute).
A mode given twice runs twice, interleaved (columns mode#1, mode#2): this machine's speed drifts by
tens of percent within an hour.

Prints samples/s, time per phase (generate, score, learn, sync) and the peak
memory of all the run's processes together (sum of RSS of the driver and every
process it started: Ray's raylet/GCS, the actors, the learners), sampled every
0.5 s. The first iteration includes warm-up and is reported separately; in async mode the last one
is left out of "steady" too (nothing is left to generate while it learns). samples/s is the
steady iterations' samples over their wall time.
Each mode also gets the model FLOPs of an iteration counted from the shapes
(iteration_gflop) and the share of the machine's matmul speed, in the precision the
run used, that each phase and the whole iteration reach; and the same against the machine's speed
on the model's own matmul shapes (a decoder layer's weight matrices times a learner micro-batch).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml


def process_name(p: psutil.Process) -> str:
    """Ray's process title (ray::PMScorer, ray::RayTrainWorker...), 'driver' for this process,
    a Python program's script (Ray's log_monitor.py, monitor.py, dashboard.py: lumped together
    as 'python' they read as a driver 0.3 GiB larger than it is), or the program's name."""
    cmd = p.cmdline()
    name = cmd[0] if cmd else p.name()
    if name.startswith("ray::"):
        return name.split()[0].split(".")[0]
    if p.pid == os.getpid():
        return "driver"
    return next((Path(a).name for a in cmd[1:] if a.endswith(".py")), Path(name).name)


def shmem_rss(pid: int) -> int:
    """Resident shared-memory pages of a process (RssShmem: Ray's object store lives in /dev/shm)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak of the summed RSS of this process and all its descendants, and who held it then."""

    def __init__(self, every: float = 0.5):
        self.peak, self.every, self._stop = 0, every, threading.Event()
        self.at_peak: dict[str, int] = {}
        self.shmem_at_peak: dict[str, int] = {}
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            by_name: dict[str, int] = {}
            shmem_by_name: dict[str, int] = {}
            for p in [me] + me.children(recursive=True):
                try:
                    name = process_name(p)
                    by_name[name] = by_name.get(name, 0) + p.memory_info().rss
                    shmem_by_name[name] = shmem_by_name.get(name, 0) + shmem_rss(p.pid)
                except (psutil.Error, OSError):
                    pass
            total = sum(by_name.values())
            if total > self.peak:
                self.peak, self.at_peak, self.shmem_at_peak = total, by_name, shmem_by_name
            self._stop.wait(self.every)

    def breakdown(self, top: int = 16) -> str:
        rows = sorted(self.at_peak.items(), key=lambda kv: -kv[1])
        rest = sum(v for _, v in rows[top:])
        shared = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in self.shmem_at_peak.items() if v >= 2**24)
        return (", ".join(f"{k} {v / 2**30:.2f}" for k, v in rows[:top]) + f", other {rest / 2**30:.2f} GiB; "
                f"of the total, shared-memory pages (object store, counted once per process that maps them) "
                f"{sum(self.shmem_at_peak.values()) / 2**30:.2f} GiB ({shared or 'none over 16 MiB'})")

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def matmul_gflops(dtype: str, seconds: float = 2.0, n: int = 1024) -> float:
    """How fast this machine is right now: GFLOP/s of an n x n matmul on all cores. A
    shared machine's speed drifts (here, by 20% and more within an hour), so each mode's
    column says what the machine gave just before it ran."""
    import torch

    a = torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ a  # the first call starts the math library's threads
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
        k += 1
    return 2 * n**3 * k / (time.perf_counter() - t0) / 1e9


# The demo's learner settings before bf16 autocast and the fused value pass, for a side-by-side column.
FP32 = {"ppo.mode": "sync", "ppo.autocast": "none", "ppo.fuse_value_pass": False, "ppo.micro_batch_size": 4,
        "ppo.pm_service_cpus": 1, "model.gradient_checkpointing": "full"}


LORA = {"model.lora_rank": 16}
GROUPS = {"generation.samples_per_prompt": 4}
MODES = {"sync": {"ppo.mode": "sync"}, "async": {"ppo.mode": "async"}, "fp32": FP32,
         "sync-fp32": {"ppo.mode": "sync", "ppo.autocast": "none"},
         "ppo-lora": LORA,
         "grpo": {**GROUPS, "ppo.advantage_estimator": "grpo"}, "rloo": {**GROUPS, "ppo.advantage_estimator": "rloo"},
         "grpo-lora": {**GROUPS, **LORA, "ppo.advantage_estimator": "grpo"},
         "rloo-lora": {**GROUPS, **LORA, "ppo.advantage_estimator": "rloo"},
         "sync-jemalloc": {"ppo.mode": "sync"}, "sync-mb4": {"ppo.mode": "sync", "ppo.micro_batch_size": 4},
         "sync-fp32-glibc": {"ppo.mode": "sync", "ppo.autocast": "none"},
         "sync-no-recompute": {"ppo.mode": "sync", "model.gradient_checkpointing": "none"},
         "sync-fp32-no-recompute": {"ppo.mode": "sync", "ppo.autocast": "none", "model.gradient_checkpointing": "none"}}
# Modes that differ in the environment the run's processes get (hh_ray.runtime.worker_env).
ENV = {"sync-jemalloc": {"HH_RAY_TRAINING_MALLOC": "jemalloc"}, "sync-fp32-glibc": {"HH_RAY_TRAINING_MALLOC": "glibc"}}


def model_shape(path: str) -> dict:
    """What the FLOP count needs: decoder parameters, layers, hidden size, vocabulary, read from
    config.json and the safetensors headers: no weights are loaded, and no model code is imported,
    into this process, whose memory the peak RSS includes (building the model on the meta device
    imported 0.18 GiB of transformers' model code)."""
    import json

    from safetensors import safe_open

    c = json.loads((Path(path) / "config.json").read_text())
    shapes = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            shapes.update({k: st.get_slice(k).get_shape() for k in st.keys()})
    body = sum(math.prod(s) for k, s in shapes.items() if k.startswith("model.") and "embed_tokens" not in k)
    layer = [tuple(s) for k, s in shapes.items() if k.startswith("model.layers.0.") and len(s) == 2]
    return {"body": body, "layers": c["num_hidden_layers"], "hidden": c["hidden_size"], "vocab": c["vocab_size"],
            "layer_matrices": layer}


def shaped_matmul_gflops(dtype: str, matrices: list[tuple[int, int]], rows: int, seconds: float = 2.0) -> float:
    """The machine's matmul speed on the model's own products: `rows` tokens (one learner
    micro-batch) through every weight matrix of a decoder layer in turn, through torch. Set
    beside the 1024^3 probe, it says whether the decoder's narrow matrices (576 wide in
    SmolLM2-135M) are what keeps a phase from the limit, or everything else is."""
    import torch

    xs = {k: torch.randn(rows, k, dtype=getattr(torch, dtype)) for _, k in matrices}
    ws = [torch.randn(n, k, dtype=getattr(torch, dtype)) for n, k in matrices]
    for w in ws:  # warm-up: kernel selection per shape
        xs[w.shape[1]] @ w.T
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for w in ws:
            xs[w.shape[1]] @ w.T
        k += 1
    return 2 * rows * sum(n * m for n, m in matrices) * k / (time.perf_counter() - t0) / 1e9


def iteration_gflop(shape: dict, row: dict, epochs: int, critic: bool = True,
                    fused: bool = True) -> dict[str, dict[str, float]]:
    """Model GFLOP of one PPO iteration by phase and by the precision it runs in ('model':
    model.dtype; 'autocast': ppo.autocast), from the shapes: a forward costs 2 x decoder
    parameters per token, plus causal attention (4 x layers x hidden x half the sequence per
    token) and the output layer (2 x hidden x vocab) where a token is predicted; a backward
    twice the forward. Generation (vLLM, model.dtype): one forward over every prompt and
    response token. Scoring: the PM's forward (autocast). Reference: pi0's log-probs (model.dtype,
    so the KL is exact); the old log-probs are vLLM's, no pass. Values: the critic's step whose
    forward gives the old values (`fused`: one epoch over one minibatch), else a no-grad forward
    and the critic's steps count with the updates. Updates: policy (and critic) forward+backward
    per epoch. Padding is not counted."""
    tokens, generated = row["tokens_sequences"], row["tokens_generated"]
    seq = tokens / row["samples"]
    per_token = 2 * shape["body"] + 4 * shape["layers"] * shape["hidden"] * seq / 2
    head = 2 * shape["hidden"] * shape["vocab"] * generated
    body = per_token * tokens
    policy, value = (body + head) / 1e9, (body if critic else 0.0) / 1e9
    fused = fused and critic
    return {"generate": {"model": policy}, "score": {"autocast": body / 1e9}, "reference": {"model": policy},
            "values": {"autocast": 3 * value if fused else value},
            "updates": {"autocast": epochs * 3 * (policy + (0.0 if fused else value))}}


def limit_fractions(gflop: dict, seconds: dict, limits: dict) -> dict[str, float]:
    """Per phase, and for the iteration (the sum over phases), the time the phase's FLOPs would
    take at the machine's matmul speed in their precisions, over the time they took."""
    ideal = {phase: sum(g / limits[kind] for kind, g in parts.items()) for phase, parts in gflop.items()}
    out = {phase: ideal[phase] / seconds[phase] for phase in gflop}
    out["iteration"] = sum(ideal.values()) / seconds["iteration"]
    return out


def steady_rows(rows: list[dict], mode: str) -> list[dict]:
    """The iterations in a steady state: not the first (warm-up), and in async mode not
    the last either: it has no next batch to generate while it learns, so it runs alone."""
    last = -1 if mode == "async" and len(rows) > 2 else None
    return rows[1:last] or rows


def untrained_pm(policy: str, cache: Path) -> str:
    """A PM folder on the policy's backbone (fresh head): timing does not depend on its quality."""
    from hh_ray.models import is_scalar_head_model, load_scalar_head_model, save_model

    out = cache / "smollm2-pm-untrained"
    if not is_scalar_head_model(str(out)):
        model, tok = load_scalar_head_model(policy)
        save_model(model, tok, out)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--modes", default="sync,async",
                    help="comma-separated, of: " + ", ".join(MODES) + " ('fp32': sync with the learner "
                         "settings of before: no autocast, no fused value pass, micro-batches of 4 with gradient "
                         "checkpointing, 1-CPU PM service)")
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")

    from hh_ray.orchestration.cluster import ensure_ray
    from hh_ray.config import load_config
    from hh_ray.orchestration.controller import train_ppo
    from hh_ray.estimators import needs_critic
    from hh_ray.models import cache_root, resolve_model
    from hh_ray.tracking import read_metrics

    policy = resolve_model(args.model)
    pm = untrained_pm(policy, cache_root())
    shape = model_shape(policy)
    ensure_ray()
    results, breakdowns, autocasts = {}, {}, {}
    columns = args.modes.split(",")
    for k, column in enumerate(columns):
        # a mode given twice (interleaved, on a machine whose speed drifts) gets a column each
        mode = column.split("#")[0]
        column = column if columns.count(column) == 1 else f"{column}#{columns[:k + 1].count(column)}"
        saved_env = {key: os.environ.get(key) for key in ENV.get(mode, {})}
        os.environ.update(ENV.get(mode, {}))
        cfg = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml", {
            **MODES[mode],
            "model.policy": policy, "model.pm": pm, "ppo.iterations": args.iterations,
            "ppo.rollout_batch_size": args.prompts, "ppo.minibatch_size": args.prompts, "ppo.epochs": 1,
            "generation.max_new_tokens": args.new_tokens, "ppo.checkpoint_every": 10**6,
            "ppo.eval_prompts": 0, "tracking.wandb": "disabled"})
        run_dir = Path(tempfile.mkdtemp(prefix=f"bench-ppo-{mode}-"))
        speed = {f"machine {dtype} matmul GFLOP/s": matmul_gflops(dtype) for dtype in ("float32", "bfloat16")}
        t0 = time.time()
        try:
            with PeakRSS() as mem:
                train_ppo(cfg, run_dir)
        finally:
            for key, value in saved_env.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        rows = read_metrics(run_dir, "ppo")
        steady = steady_rows(rows, cfg.ppo.mode)
        results[column] = {
            "samples/s (steady)": sum(r["samples"] for r in steady) / sum(r["time_iteration"] for r in steady),
            "s/iteration (steady)": statistics.mean(r["time_iteration"] for r in steady),
            "s/iteration (first)": rows[0]["time_iteration"],
            "generate s": statistics.mean(r["time_generate"] for r in steady),
            "score s": statistics.mean(r["time_score"] for r in steady),
            "learn s": statistics.mean(r["time_learn"] for r in steady),
            "  reference s": statistics.mean(r["time_learn_reference"] for r in steady),
            "  values s": statistics.mean(r["time_learn_forward"] - r["time_learn_reference"] for r in steady),
            "  updates s": statistics.mean(r["time_learn_update"] for r in steady),
            "sync s": statistics.mean(r["time_sync"] for r in steady),
            "tokens/iteration": statistics.mean(r["tokens_generated"] for r in steady),
            "peak RSS GiB (all processes)": mem.peak / 2**30,
            "wall s (incl. start-up)": time.time() - t0,
            **speed,
        }
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        precision = {"model": saved["model"]["dtype"],
                     "autocast": "bfloat16" if saved["ppo"]["autocast"] == "bfloat16" else saved["model"]["dtype"]}
        limits = {kind: speed[f"machine {dtype} matmul GFLOP/s"] for kind, dtype in precision.items()}
        per_row = [iteration_gflop(shape, r, cfg.ppo.epochs, needs_critic(cfg.ppo.advantage_estimator),
                                   bool(r["fused_value_pass"])) for r in steady]
        gflop = {phase: {kind: statistics.mean(r[phase][kind] for r in per_row) for kind in parts}
                 for phase, parts in per_row[0].items()}
        res = results[column]
        seconds = {"generate": res["generate s"], "score": res["score s"], "reference": res["  reference s"],
                   "values": res["  values s"], "updates": res["  updates s"], "iteration": res["s/iteration (steady)"]}
        res["model GFLOP/iteration"] = sum(sum(parts.values()) for parts in gflop.values())
        for phase, fraction in limit_fractions(gflop, seconds, limits).items():
            res[f"% of matmul limit: {phase}"] = 100 * fraction
        # The same against the machine's speed on the model's own matmul shapes (a micro-batch of
        # whole sequences of this run's mean length), measured after the run.
        rows = cfg.ppo.micro_batch_size * round(statistics.mean(r["tokens_sequences"] / r["samples"] for r in steady))
        shaped = {kind: shaped_matmul_gflops(dtype, shape["layer_matrices"], rows) for kind, dtype in precision.items()}
        res["micro-batch rows"] = rows
        res.update({f"micro-batch rows, {dtype} matmul GFLOP/s": shaped[kind] for kind, dtype in precision.items()})
        for phase, fraction in limit_fractions(gflop, seconds, shaped).items():
            res[f"% of model-shape limit: {phase}"] = 100 * fraction
        res["generated tokens/s"] = res["tokens/iteration"] / res["generate s"]
        autocasts[column] = saved["ppo"]["autocast"]
        breakdowns[column] = mem.breakdown()
        shutil.rmtree(run_dir)  # its final checkpoint alone is ~4 GB
    from hh_ray.runtime import processor_name

    print(f"\nSmolLM2-135M PPO: {args.prompts} sequences x {args.new_tokens} new tokens, 1 epoch, 1 minibatch, "
          f"{os.cpu_count()} CPUs ({processor_name()}); ppo.autocast: "
          + ", ".join(f"{m} {a}" for m, a in autocasts.items())
          + "; the matmul limit of a phase is the machine's speed in the precision each of its passes runs in "
            "(generation and the reference pass in model.dtype, the rest in ppo.autocast)")
    modes = list(results)
    print(f"{'':40}" + "".join(f"{m:>12}" for m in modes))
    for key in dict.fromkeys(k for m in modes for k in results[m]):
        print(f"{key:40}" + "".join(f"{results[m].get(key, float('nan')):>12.2f}" for m in modes))
    for m in modes:
        print(f"RSS at the peak, {m}: {breakdowns[m]}")


if __name__ == "__main__":
    main()
