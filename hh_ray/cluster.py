"""Connect to Ray: the cluster RAY_ADDRESS names, the one this process is in
(`ray job submit`), or a fresh local one."""

from __future__ import annotations

import json
import os


def worker_env() -> dict[str, str]:
    """Environment every actor and learner needs, passed through Ray's runtime_env."""
    keep = ("HH_RAY_CACHE", "WANDB_MODE", "HF_HUB_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM", "MALLOC_CONF")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # glibc malloc fragments badly under PyTorch's training churn on CPU (DESIGN.md §3:
    # 18.8 GB vs 14.5 GB with jemalloc for the same step); Ray ships jemalloc.
    jemalloc = _ray_jemalloc()
    if jemalloc and "LD_PRELOAD" not in os.environ:
        env["LD_PRELOAD"] = jemalloc
        # Hand freed pages back after 1 s instead of 10 s, from a background thread: a learner's
        # no-grad pass, its policy step and its critic step then do not hold each other's
        # peaks (bench_ppo: 11.97 -> 11.78 GiB summed RSS).
        env.setdefault("MALLOC_CONF", "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0")
    return env


def _ray_jemalloc() -> str | None:
    import ray

    path = os.path.join(os.path.dirname(ray.__file__), "core", "libjemalloc.so")
    return path if os.path.exists(path) else None


def _job_env_vars() -> dict[str, str]:
    """env_vars of the `ray job submit --runtime-env-json` this driver runs under, if any."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    return (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}


def ensure_ray(num_cpus: int | None = None):
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            # Ray refuses to merge a job's runtime env with a driver's that sets
            # the same variables: add only those the job did not set.
            job = _job_env_vars()
            ray.init(runtime_env={"env_vars": {k: v for k, v in worker_env().items() if k not in job}})
        else:
            # A one-machine cluster has no node to be preempted: Ray Train's
            # preemption-watcher actor would only cost a process (~0.2 GB).
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            # Nor idle worker processes started ahead of need (~80 MB each): every
            # process here is a long-lived actor.
            os.environ.setdefault("RAY_enable_worker_prestart", "0")
            os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
            # Logical CPUs above the physical count let generation actors,
            # the PM service and learners coexist on a small machine.
            ray.init(num_cpus=num_cpus or max(8, os.cpu_count() or 1), include_dashboard=False,
                     runtime_env={"env_vars": worker_env()})
    return ray
