"""`hh-ray demo`: the paper's method end to end on one machine, no network.

prepare SmolLM2-135M-Instruct -> synthetic comparisons -> train the PM ->
PPO against it with a KL penalty -> reward/KL table, reward-vs-sqrt(KL) plot, report.
"""

from __future__ import annotations

import time
from pathlib import Path

from hh_ray.config import Config

from hh_ray.orchestration.controller import train_ppo
from learners.pm_learner import train_pm


def demo(cfg: Config, run_dir: Path, resume: bool = False) -> int:
    from hh_ray.models import is_scalar_head_model, resolve_model

    run_dir = Path(run_dir)
    t0 = time.time()
    times = {}
    print(f"== 1/3 model: {cfg.model.policy}", flush=True)
    policy = resolve_model(cfg.model.policy, cfg.model.cache_dir)
    times["prepare model"] = time.time() - t0
    print(f"   {policy}")

    pm_dir = run_dir / "pm"
    t = time.time()
    if is_scalar_head_model(str(pm_dir)):
        print(f"== 2/3 preference model: reusing {pm_dir}", flush=True)
    else:
        print(f"== 2/3 preference model on {cfg.data.source} comparisons", flush=True)
        pm_dir = train_pm(cfg, run_dir, resume=resume)
    times["train PM"] = time.time() - t

    t = time.time()
    print("== 3/3 PPO against the PM, KL penalty to the initial policy", flush=True)
    cfg.model.pm = str(pm_dir)
    result = train_ppo(cfg, run_dir, resume=resume)
    times["PPO"] = time.time() - t

    from hh_ray.report import write_report

    print(f"report: {write_report(run_dir)}")
    total = time.time() - t0
    print("\n".join(f"   {k:<14} {v:7.1f}s" for k, v in times.items()))
    print(f"demo finished in {total / 60:.1f} min; run folder {run_dir.resolve()} "
          f"(W&B files in {run_dir.resolve() / 'wandb'}; upload with `wandb sync`)")
    before, after = result["reward_pm_heldout_before"], result["reward_pm_heldout_after"]
    if before is not None:
        print(f"held-out PM reward {before:+.4f} -> {after:+.4f}")
    return 0
