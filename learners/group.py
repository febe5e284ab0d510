"""What every Ray Train learner group shares: the run folder's checkpoint guard, the
`TorchTrainer` (gloo on CPU, NCCL when every worker gets a GPU) and `fit()` with
metrics drained from a Queue while it blocks (Ray Train V2 keeps no metrics
without a checkpoint, so workers send them through a `ray.util.queue.Queue`).

Checkpoints are not Ray Train's: workers write them with learners.kit into
run_dir/checkpoints/step-N and restore the newest that verifies on start and
after a worker-group restart; Ray Train keeps only its own run files beside them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from hh_ray.checkpoint import clean_leftovers, complete_checkpoints, no_checkpoint_error, resume_checkpoint

CHECKPOINTS = "checkpoints"


def checkpoint_to_resume(run_dir: Path, resume: bool) -> tuple[Path, Path | None]:
    """(run_dir/checkpoints, the checkpoint to resume or None); refuses to mix runs in one folder.

    resume: the newest checkpoint that verifies (corrupt or incomplete newer ones are skipped,
    and said so), leftovers of killed saves cleaned first; none is an error naming the folder.
    A fresh run into a folder that holds a checkpoint is refused before anything is written."""
    root = Path(run_dir) / CHECKPOINTS
    if not resume:
        if done := complete_checkpoints(root):
            raise ValueError(f"{run_dir} already holds checkpoints ({done[-1]}): pass --resume to continue it, "
                             "or another --run-dir")
        clean_leftovers(root, recover=False)
        return root, None
    clean_leftovers(root)
    latest = resume_checkpoint(root)
    if latest is None:
        raise no_checkpoint_error(root)
    return root, latest


def torch_trainer(train_loop, **kwargs):
    """Ray Train's `TorchTrainer` less the helper actors this project never uses, each a
    Python process of ~0.2 GB: the DatasetManager (it serves Ray Datasets, and we pass
    none) and, on a cluster this process started, the PlacementGroupCleaner (it frees
    the placement group of a controller that died uncleanly; here the whole cluster
    ends with this process, and without a dashboard it only logs that it cannot reach
    the State API, every few seconds) and the AutoscalingCoordinator (Ray Data's actor
    through which a fixed-size group asks an autoscaler for its workers' resources: a
    cluster started here has no autoscaler). Ray versions without the hooks keep them."""
    import ray
    from ray.train.torch import TorchTrainer

    # Ray's node handle: head=True when ray.init started the cluster in this process.
    started_here = getattr(getattr(ray._private.worker, "_global_node", None), "head", False)
    unused = {"DatasetsCallback"} | ({"PlacementGroupCleanerCallback"} if started_here else set())

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [cb for cb in super()._create_default_callbacks() if type(cb).__name__ not in unused]

        def _initialize_and_run_controller(self, **controller_args):
            policy = controller_args.get("scaling_policy")
            if started_here and type(policy).__name__ == "FixedScalingPolicy":
                class LocalFixedScalingPolicy(type(policy)):  # asks no autoscaler (none is there)
                    def after_controller_start(self, train_run_context):
                        pass

                    def _maybe_send_resource_request(self):
                        pass

                policy.__class__ = LocalFixedScalingPolicy
            return super()._initialize_and_run_controller(**controller_args)

        def _register_sigint_handler(self, controller):
            # fit() in the main thread would take over SIGINT for good (never restored): a
            # "graceful abort" that waits on Ray Train, and after fit() returned a handler
            # for a controller that is gone. Ctrl-C stays a KeyboardInterrupt, which the
            # CLI turns into a bounded stop (hh_ray/orchestration/cli.py, Interrupts).
            pass

    return Trainer(train_loop, **kwargs)


def group_uses_gpu(num_workers: int) -> bool:
    """A learner group of num_workers trains on GPUs when the cluster has one for each."""
    import ray

    return ray.cluster_resources().get("GPU", 0) >= num_workers


def worker_resources(num_workers: int, cpus_per_worker: int = 1) -> dict[str, float]:
    """What one worker of a PM/distillation learner group asks Ray for: a GPU where the
    cluster has one for each worker, else its CPUs (Ray sets its torch threads from them)."""
    return {"CPU": 1, "GPU": 1} if group_uses_gpu(num_workers) else {"CPU": cpus_per_worker}


PROBE_TIMEOUT_S = 60.0  # how long the learners' precision probe waits for a node with a learner's resources


def with_learner_autocast(cfg, key: str, resources: dict[str, float]):
    """cfg with the learners' autocast setting at `key` resolved where a learner runs.

    'auto' is measured by a one-off Ray task that asks for one learner worker's `resources`
    (Ray's names: CPU, GPU and custom ones), so it lands on a node a learner could take: the
    driver may sit on a head node with another processor and no GPU, and a GPU without bf16
    (T4, V100) must train in full precision. If no such node is free within PROBE_TIMEOUT_S
    (an autoscaler still starting one), the driver decides (bf16 for workers that get GPUs,
    else by its own processor) and says so."""
    import ray

    from hh_ray.config import with_value
    from hh_ray.runtime import resolve_autocast, worker_env

    section, name = key.split(".")
    value, why = getattr(getattr(cfg, section), name), "set in the config"
    if value == "auto":
        custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
        # max_calls=1: the worker exits after it (an idle worker with torch loaded holds ~0.4 GiB).
        probe = ray.remote(max_calls=1)(_resolve_autocast_on_this_node).options(
            num_cpus=resources.get("CPU", 0), num_gpus=resources.get("GPU", 0), resources=custom,
            runtime_env={"env_vars": worker_env()})
        ref = probe.remote(cfg.model.cache_dir)
        try:
            value, why = ray.get(ref, timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            value, why = resolve_autocast("auto", cfg.model.cache_dir, workers_on_gpu=resources.get("GPU", 0) > 0)
            why += f"; decided by the driver: no node had a learner's resources {resources} free in {PROBE_TIMEOUT_S:.0f} s"
    print(f"{key}={value} ({why})", flush=True)  # and config.yaml records what the run used
    return with_value(cfg, key, value)


def _resolve_autocast_on_this_node(cache_dir: str) -> tuple[str, str]:
    import socket

    from hh_ray.runtime import resolve_autocast

    value, why = resolve_autocast("auto", cache_dir)
    return value, f"{why}; measured on a learner's node, {socket.gethostname()}"


def learner_trainer(train_loop, config: dict, num_workers: int, ckpt_root: Path, cpus_per_worker: int = 1,
                    max_failures: int = 0, autocast: str = "none"):
    """A TorchTrainer of num_workers workers on the running Ray cluster.

    Ray Train's run files go under ckpt_root (beside the step-N checkpoints the
    workers write there themselves). After a worker dies, Ray restarts the group up
    to max_failures times; the new workers resume from resume_checkpoint(ckpt_root).
    `autocast`: the precision the workers train in, resolved (it picks their allocator).
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from hh_ray.runtime import worker_env

    resources = worker_resources(num_workers, cpus_per_worker)
    use_gpu = "GPU" in resources
    return torch_trainer(
        train_loop, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=time.strftime("attempt-%Y%m%d-%H%M%S"), storage_path=str(ckpt_root),
                             failure_config=FailureConfig(max_failures=max_failures),
                             worker_runtime_env={"env_vars": worker_env(trains_in=autocast)}),
    )


def fit_and_log(trainer, queue, on_message) -> None:
    """trainer.fit() while a thread hands every queued message to on_message (fit blocks this thread).

    The thread keeps draining until fit() has returned and the queue is empty,
    so the workers' last messages are logged too.
    """
    finished = threading.Event()

    def drain() -> None:
        while True:
            try:
                m = queue.get(timeout=0.5)
            except Exception:  # queue.Empty
                if finished.is_set():
                    return
                continue
            on_message(m)

    logger = threading.Thread(target=drain, daemon=True)
    logger.start()
    interrupted = False
    try:
        trainer.fit()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (the CLI): the workers keep sending until Ray ends
        interrupted = True
        raise
    finally:
        finished.set()
        if interrupted:  # end the queue first: the drain thread's wait fails at once and it returns
            queue.shutdown(force=True)
            logger.join(timeout=2.0)
        else:
            logger.join()
            queue.shutdown()
