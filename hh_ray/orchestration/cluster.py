"""Connect to Ray: the cluster RAY_ADDRESS names, the one this process is in
(`ray job submit`), or a fresh local one."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import ray

from hh_ray.runtime import worker_env


def _job_env_vars() -> dict[str, str]:
    """env_vars of the `ray job submit --runtime-env-json` this driver runs under, if any."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    return (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}


def ensure_ray(num_cpus: int | None = None, quiet: bool = False):
    """Connect to RAY_ADDRESS, or start a local cluster. quiet: on a local cluster, the
    workers' output (vLLM's engine reports, Ray Train's) stays in the cluster's log files
    instead of being copied to this console, and Ray's own INFO lines are not shown;
    errors still reach the driver, as exceptions with the worker's traceback."""
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
                     runtime_env={"env_vars": worker_env()}, log_to_driver=not quiet,
                     logging_level=logging.WARNING if quiet else logging.INFO)
    return ray


def link_logs(run_dir: Path) -> Path | None:
    """RUN_DIR/ray-logs -> the log folder of the cluster this process started (every
    worker's stdout/stderr, vLLM's and Ray Train's reports); None on a joined cluster,
    whose logs are on its nodes (`ray job logs`)."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not local_cluster_processes():
        return None
    target = Path(node.get_logs_dir_path())
    link = Path(run_dir) / "ray-logs"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return link


# ---------------------------------------------------------------- stopping (Ctrl-C, SIGTERM)
#
# What a run leaves behind depends on how it reached Ray. A cluster `ensure_ray` started
# here (no RAY_ADDRESS) is this process's own: GCS, raylet, log monitor, autoscaler monitor
# and minimal dashboard are its children, and the raylet's children (the dashboard and
# runtime-env agents, every worker: generation actors, the PM service, the queue actor, Ray
# Train's controller and learners, and what they started) descend from them. On a cluster
# it only joined (RAY_ADDRESS, `ray job submit`), none of the cluster's processes are its
# own: Ray ends the job's (non-detached) actors when the driver exits.


def local_cluster_processes() -> list:
    """psutil handles of every process of a cluster `ensure_ray` started here (GCS, raylet,
    monitors and everything below them); [] for a joined cluster."""
    import psutil

    node = getattr(ray._private.worker, "_global_node", None)
    procs = []
    for infos in (getattr(node, "all_processes", None) or {}).values():
        for info in infos:
            try:
                root = psutil.Process(info.process.pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.Error:
                pass
    return procs


def leave_ray_now() -> None:
    """Before an interrupted run kills its local cluster's processes and exits: no
    `ray.shutdown()`, now or in Ray's exit hook (removed here). It shuts this process's core
    worker down while other threads (a learner group's fit(), a metrics drain) still call
    Ray, and a call in that window makes Ray's core worker end the process on the spot (exit
    status 1, the rest of the clean-up skipped: agents and workers not yet stopped stayed
    behind); against a killed GCS it would also wait seconds. Nor may a thread's next Ray
    call auto-start a new local cluster. A joined cluster's Ray ends the job's actors when
    this driver exits."""
    import atexit

    atexit.unregister(ray._private.worker.shutdown)
    auto_init = getattr(ray._private, "auto_init_hook", None)  # loaded by `import ray`
    if auto_init is not None:
        auto_init.enable_auto_connect = False
