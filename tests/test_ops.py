"""Operations as a user runs them: a Ray cluster from `ray start --head` on
127.0.0.1, a PPO driver SIGKILLed mid-run, the run resumed through
`ray job submit`, and cluster.yaml checked by Ray's own autoscaler validation."""

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
from hh_ray.config import load_config, parse_resources
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
    subprocess.run([BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
                    f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                    "--num-cpus=8", f"--temp-dir={temp}", "--disable-usage-stats"],
                   check=True, env=env, timeout=300, capture_output=True)
    try:
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
         "--run-dir", run_dir, "--ppo.iterations", str(ITERATIONS), "--ppo.checkpoint_every", "2"],
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


def test_cluster_yaml_passes_rays_autoscaler_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    # The dashboard stays on localhost.
    assert any("--dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"])
    # The custom resources configs/multinode.yaml asks for exist on the node types.
    cfg = load_config(ROOT / "configs" / "multinode.yaml")
    offered = {r for t in raw["available_node_types"].values() for r in t.get("resources", {})}
    wanted = set(parse_resources(cfg.generation.resources)) | set(parse_resources(cfg.ppo.learner_resources))
    assert wanted and wanted <= offered
    broken = {**raw, "max_workers": "many"}
    with pytest.raises(Exception, match="max_workers"):
        validate_config(prepare_config(broken))


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
