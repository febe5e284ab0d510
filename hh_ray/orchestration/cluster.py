"""Connect to Ray: the cluster RAY_ADDRESS names, the one this process is in
(`ray job submit`), or a fresh local one."""

from __future__ import annotations

import json
import os

import ray

from hh_ray.runtime import worker_env


def _job_env_vars() -> dict[str, str]:
    """env_vars of the `ray job submit --runtime-env-json` this driver runs under, if any."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    return (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}


def ensure_ray(num_cpus: int | None = None):
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
