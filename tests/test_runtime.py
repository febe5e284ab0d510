"""What every process sets up alike (hh_ray/runtime.py): seeds, the precision for the hardware."""

import json
import os

import pytest

from hh_ray import runtime


def test_derive_seed_is_stable_and_keyed():
    assert runtime.derive_seed(0, "rollouts", 3) == runtime.derive_seed(0, "rollouts", 3)
    seeds = {runtime.derive_seed(s, k, i) for s in (0, 1) for k in ("rollouts", "heldout") for i in range(50)}
    assert len(seeds) == 200 and all(0 <= x < 2**63 for x in seeds)


@pytest.mark.parametrize("fp32,bf16,want", [(1e-3, 0.5e-3, "bfloat16"), (1e-3, 50e-3, "none")])
def test_auto_autocast_picks_bf16_only_where_it_is_fast(monkeypatch, fp32, bf16, want):
    monkeypatch.setattr(runtime, "cpu_matmul_seconds", lambda cache_dir="": (fp32, bf16))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    got, why = runtime.resolve_autocast("auto")
    assert got == want and "fp32" in why and "bf16" in why
    assert runtime.resolve_autocast("bfloat16") == ("bfloat16", "set in the config")


def test_auto_autocast_for_gpu_workers_does_not_follow_the_drivers_processor(monkeypatch):
    # A driver on a CPU-only head node whose processor runs bf16 slowly, learners on GPUs.
    monkeypatch.setattr(runtime, "cpu_matmul_seconds", lambda cache_dir="": (1.0, 50.0))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert runtime.resolve_autocast("auto")[0] == "none"
    got, why = runtime.resolve_autocast("auto", workers_on_gpu=True)
    assert got == "bfloat16" and "GPUs" in why


def test_the_cpu_probe_runs_once_per_processor(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "_matmul_seconds", lambda dtype: calls.append(dtype) or 1.0)
    assert runtime.cpu_matmul_seconds(str(tmp_path)) == (1.0, 1.0)
    assert runtime.cpu_matmul_seconds(str(tmp_path)) == (1.0, 1.0)
    assert calls == ["float32", "bfloat16"]
    assert len(json.loads((tmp_path / "cpu_matmul.json").read_text())) == 1


def test_the_real_probe_measures_both_precisions():
    fp32, bf16 = runtime._matmul_seconds("float32", n=128, reps=3), runtime._matmul_seconds("bfloat16", n=128, reps=3)
    assert fp32 > 0 and bf16 > 0


def test_a_torn_last_metrics_line_is_skipped_and_a_bad_middle_line_named(tmp_path):
    from hh_ray.tracking import read_metrics

    rows = '{"stage": "ppo", "step": 1}\n{"stage": "ppo", "step": 2}\n'
    (tmp_path / "metrics.jsonl").write_text(rows + '{"stage": "ppo", "st')
    with pytest.warns(UserWarning, match="metrics.jsonl:3: skipping a torn last line"):
        assert [r["step"] for r in read_metrics(tmp_path, "ppo")] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text('{"stage": "ppo", "st\n' + rows)
    with pytest.raises(ValueError, match="metrics.jsonl:1: not a JSON row"):
        read_metrics(tmp_path)


def test_config_yaml_is_replaced_whole(tmp_path):
    from hh_ray.config import Config, load_config, save_config

    save_config(Config(), tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == Config() and not (tmp_path / "config.yaml.tmp").exists()


def test_a_resumed_tracker_drops_the_torn_row_before_appending(tmp_path):
    from hh_ray.config import load_config
    from hh_ray.tracking import Tracker, read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"stage": "ppo", "step": 1}\n{"stage": "ppo", "st')
    with pytest.warns(UserWarning, match="dropping a torn last line"):
        tracker = Tracker(tmp_path, load_config(None, {"tracking.wandb": "disabled"}), "ppo")
    tracker.log(2, {"x": 1.0})
    tracker.close()
    assert [r["step"] for r in read_metrics(tmp_path, "ppo")] == [1, 2]


def test_learners_get_glibc_with_huge_pages_and_the_other_actors_jemalloc(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(runtime.TRAINING_MALLOC, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(runtime, "ray_jemalloc", lambda: "/ray/libjemalloc.so")
    assert runtime.worker_env()["LD_PRELOAD"] == "/ray/libjemalloc.so"
    bf16 = runtime.worker_env(trains_in="bfloat16")
    # "" overrides the jemalloc that the job's runtime_env gives every worker
    assert bf16["LD_PRELOAD"] == "" and bf16["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert runtime.worker_env(trains_in="none")["LD_PRELOAD"] == "/ray/libjemalloc.so"  # fp32 learners
    monkeypatch.setenv(runtime.TRAINING_MALLOC, "jemalloc")
    assert runtime.worker_env(trains_in="bfloat16")["LD_PRELOAD"] == "/ray/libjemalloc.so"
    monkeypatch.setenv(runtime.TRAINING_MALLOC, "glibc")
    assert runtime.worker_env(trains_in="none")["LD_PRELOAD"] == ""
    assert runtime.worker_env()["LD_PRELOAD"] == "/ray/libjemalloc.so"  # not a learner: not its business
    monkeypatch.setenv("LD_PRELOAD", "/my/allocator.so")  # the user's own choice: left to every process
    assert "LD_PRELOAD" not in runtime.worker_env(trains_in="bfloat16") and "LD_PRELOAD" not in runtime.worker_env()


def test_malloc_in_use_reads_the_process_it_runs_in():
    import subprocess
    import sys

    jemalloc = runtime.ray_jemalloc()
    assert jemalloc, "Ray ships libjemalloc.so"
    ask = [sys.executable, "-c", "from hh_ray.runtime import malloc_in_use; print(malloc_in_use())"]
    for preload, want in (("", "glibc"), (jemalloc, "jemalloc")):
        out = subprocess.run(ask, env={**os.environ, "LD_PRELOAD": preload}, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want
