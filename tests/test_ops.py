"""Operations as a user runs them: a two-node Ray cluster on this machine from `ray start
--head` (the learner node of cluster.yaml) and `ray start --address` (a generator node), a
PPO driver SIGKILLed mid-run, the run resumed through `ray job submit` with generators and
learners placed on their own nodes, and cluster.yaml checked by Ray's own autoscaler validation."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from hh_ray.checkpoint import PPO_CHECKPOINTS, latest_checkpoint, read_state
from hh_ray.config import load_config
from hh_ray.tracking import read_metrics
from tests.conftest import ROOT

BIN = Path(sys.executable).parent
ITERATIONS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(temp_dir: str) -> None:
    """`ray stop` for one cluster. (`ray stop` itself stops every Ray instance on
    the machine, the test session's own cluster included.) Every process of a
    `ray start` names its --temp-dir on its command line."""
    procs = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()


@pytest.fixture(scope="module")
def head(cache_dir):
    temp = tempfile.mkdtemp(prefix="hhray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dashboard = free_port(), free_port()
    # Not this process's W&B service (WANDB_SERVICE): a driver killed while
    # attached to it would leave its run open there.
    env = {k: v for k, v in os.environ.items() if "WANDB" not in k and k != "RAY_ADDRESS"}
    env.update(PATH=f"{BIN}:{os.environ['PATH']}", HH_RAY_CACHE=cache_dir, WANDB_MODE="offline",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # Fixed ports from the ephemeral range, outside Ray's worker ports (10002-19999), so
    # they cannot collide with the workers of this session's own cluster.
    common = ["--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats", "--num-cpus=4"]
    try:
        subprocess.run([BIN / "ray", "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={dashboard}", "--include-dashboard=true",
                        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                        '--resources={"hh_learner": 2}', *common],
                       check=True, env=env, timeout=300, capture_output=True)
        subprocess.run([BIN / "ray", "start", f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={free_port()}",
                        '--resources={"hh_generator": 2}', *common],
                       check=True, env=env, timeout=300, capture_output=True)
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        stop_cluster(temp)


@pytest.fixture(scope="module")
def killed_driver_run(head, tiny_pm, tmp_path_factory):
    """`hh-ray train-ppo` against the cluster, SIGKILLed once its first checkpoint exists."""
    run_dir = tmp_path_factory.mktemp("ops") / "ppo"
    log = open(run_dir.parent / "driver.log", "w")
    driver = subprocess.Popen(
        [BIN / "hh-ray", "train-ppo", "--config", ROOT / "configs" / "tiny.yaml", "--model.pm", tiny_pm,
         "--run-dir", run_dir, "--ppo.iterations", str(ITERATIONS), "--ppo.checkpoint_every", "2",
         # placed as configs/multinode.yaml places them on cluster.yaml's node types
         "--generation.num_workers", "2", "--generation.resources", "hh_generator=1",
         "--ppo.learner_resources", "hh_learner=1"],
        env={**head["env"], "RAY_ADDRESS": head["address"]}, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 900
    while latest_checkpoint(run_dir / PPO_CHECKPOINTS) is None:
        assert driver.poll() is None, (run_dir.parent / "driver.log").read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint within 15 minutes"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    log.close()
    return run_dir


def test_killed_driver_resumes_through_ray_job_submit(head, killed_driver_run):
    run_dir = killed_driver_run
    assert not (run_dir / "policy").exists()  # it really died mid-run
    ckpt = read_state(latest_checkpoint(run_dir / PPO_CHECKPOINTS))
    start = ckpt["iteration"]
    assert 2 <= start < ITERATIONS

    job = f"hh-ray-resume-{os.getpid()}"
    runtime_env = {"env_vars": {k: head["env"][k] for k in ("HH_RAY_CACHE", "WANDB_MODE", "HF_HUB_OFFLINE")}}
    submit = subprocess.run(
        [BIN / "ray", "job", "submit", "--address", head["dashboard"], "--submission-id", job,
         "--runtime-env-json", json.dumps(runtime_env), "--",
         str(BIN / "hh-ray"), "train-ppo", "--run-dir", str(run_dir), "--resume"],
        env=head["env"], capture_output=True, text=True, timeout=900)
    print(submit.stdout[-4000:])
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head["dashboard"])
    assert client.get_job_status(job) == JobStatus.SUCCEEDED
    logs = client.get_job_logs(job)
    # The job went on from the checkpoint: no iteration before it was run again.
    assert f"[ppo {start + 1}/{ITERATIONS}]" in logs and f"[ppo {ITERATIONS}/{ITERATIONS}]" in logs
    assert f"[ppo {start}/{ITERATIONS}]" not in logs

    rows = read_metrics(run_dir, "ppo", last_per_step=True)
    assert [r["step"] for r in rows] == list(range(1, ITERATIONS + 1))
    assert (run_dir / "policy" / "config.json").exists() and (run_dir / "reward_vs_sqrt_kl.png").exists()

    # Generators on the generator node, learners on the learner node (the head), weights
    # broadcast from one to the other; the placement row and the log say so.
    placement = read_metrics(run_dir, "placement")[-1]  # the resumed job's
    print("placement:", json.dumps(placement))
    generators = {g["node_id"] for g in placement["generation"]}
    learners = {r["node_id"] for r in placement["learners"]}
    assert len(placement["generation"]) == 2 and len(generators) == len(learners) == 1 and generators != learners
    nodes = {n["NodeID"]: n["Resources"] for n in _cluster_nodes(head)}
    assert "hh_generator" in nodes[generators.pop()] and "hh_learner" in nodes[learners.pop()]
    assert "placement: generation" in logs and "weight sync: broadcast" in logs
    assert all(r["sync_bytes"] > 0 for r in rows[start:])


def _cluster_nodes(head) -> list[dict]:
    """The two-node cluster's nodes, asked from a separate process (this one is attached to
    the test session's own cluster)."""
    out = subprocess.run([sys.executable, "-c", "import json, ray; ray.init(address=%r, log_to_driver=False); "
                          "print(json.dumps([{'NodeID': n['NodeID'], 'Resources': n['Resources']} "
                          "for n in ray.nodes() if n['Alive']]))" % head["address"]],
                         env=head["env"], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cluster_yaml_passes_rays_autoscaler_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    # The dashboard stays on localhost.
    assert any("--dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"])
    broken = {**raw, "max_workers": "many"}
    with pytest.raises(Exception, match="max_workers"):
        validate_config(prepare_config(broken))


# Where each shipped config runs: configs/multinode.yaml on cluster.yaml's node types (the head
# runs only the driver), gpu-1node.yaml on one 8-GPU node, the CPU configs on one machine as
# `ensure_ray` starts it (8 logical CPUs).
ONE_GPU_NODE = {"gpu": {"resources": {"CPU": 96, "GPU": 8}, "max_workers": 1}}
ONE_CPU_MACHINE = {"local": {"resources": {"CPU": 8}, "max_workers": 1}}


def _node_types(cluster_yaml: dict) -> dict:
    return {name: {"resources": t["resources"], "max_workers": t.get("max_workers", 1)}
            for name, t in cluster_yaml["available_node_types"].items()}


@pytest.mark.parametrize("name", ["tiny", "demo", "gpu-1node", "multinode"])
def test_shipped_configs_fit_the_nodes_they_are_for(name):
    from hh_ray.config import CHOICES
    from hh_ray.placement import check_placement, demands

    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    nodes = {"multinode": _node_types(yaml.safe_load((ROOT / "cluster.yaml").read_text())),
             "gpu-1node": ONE_GPU_NODE}.get(name, ONE_CPU_MACHINE)
    assert check_placement(cfg, nodes) == []
    assert cfg.generation.weight_sync in CHOICES["generation.weight_sync"]  # a sync mode the code drives
    if name != "multinode":
        return
    wanted = {what: need for what, _, need in demands(cfg, cluster_gpus=48)}
    assert wanted["generation worker"] == {"CPU": 4.0, "GPU": 1.0, "hh_generator": 1.0}
    assert wanted["PPO learner"] == {"CPU": 1.0, "GPU": 1.0, "hh_learner": 1.0}


def test_placement_check_names_what_does_not_fit():
    from hh_ray.config import with_value
    from hh_ray.placement import check_placement

    nodes = _node_types(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    cfg = load_config(ROOT / "configs" / "multinode.yaml")
    too_many = with_value(cfg, "ppo.num_learners", 40)  # 4 learner nodes x 8 GPUs = 32
    assert any("PPO learner 33 of 40" in p for p in check_placement(too_many, nodes))
    wrong_resource = with_value(cfg, "generation.resources", "hh_trainer=1")
    assert any("generation worker: needs" in p and "hh_trainer" in p for p in check_placement(wrong_resource, nodes))
    tp8 = with_value(cfg, "generation.tensor_parallel_size", 8)  # generator nodes have 4 GPUs
    assert any("generation worker" in p for p in check_placement(tp8, nodes))


def test_secrets_stay_out_of_run_folders(tmp_path, monkeypatch):
    """A W&B key in the environment is used, never written: not in config.yaml,
    metrics.jsonl or the W&B run files."""
    from hh_ray.config import load_config as load
    from hh_ray.tracking import Tracker

    secret = "hhray-secret-" + "7" * 24
    monkeypatch.setenv("WANDB_API_KEY", secret)
    tracker = Tracker(tmp_path, load(None, {"tracking.wandb": "offline"}), "ppo")
    tracker.log(1, {"reward_pm": 0.5})
    tracker.close()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.suffix == ".wandb" for p in files)
    assert not [p for p in files if secret.encode() in p.read_bytes()]
