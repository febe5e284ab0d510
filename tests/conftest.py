"""One local Ray cluster and one tiny model per test session.

Integration tests share these (starting Ray or a vLLM engine costs seconds,
and cold imports alone take ~10 s per process), so fixtures are session-scoped
and actors are reused.
"""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Keep every run offline and inside the session's temp space.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    d = os.environ.get("HH_RAY_CACHE") or str(tmp_path_factory.mktemp("hh-ray-cache"))
    os.environ["HH_RAY_CACHE"] = d
    return d


@pytest.fixture(scope="session")
def tiny_model(cache_dir):
    """Path of the tiny random Llama policy (HF folder, tokenizer included)."""
    from hh_ray.models import resolve_model

    return resolve_model("tiny", cache_dir)


@pytest.fixture(scope="session")
def tiny_chat_model(cache_dir):
    """Path of the tiny random Llama whose tokenizer has a ChatML chat template ('tiny-chat')."""
    from hh_ray.models import resolve_model

    return resolve_model("tiny-chat", cache_dir)


@pytest.fixture(scope="session")
def ray_cluster(cache_dir):
    """A real local Ray cluster for the whole session.

    Logical CPUs exceed the 2 real cores so that 2 generation actors, a PM
    service and 2 learner workers can be placed at once.
    """
    import ray

    if ray.is_initialized():  # a CLI test ran `main` in this process before: its cluster, not ours
        ray.shutdown()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"HH_RAY_CACHE": cache_dir, "WANDB_MODE": "offline",
                                       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def hh_data_dir():
    d = os.environ.get("HH_DATA_DIR")
    return Path(d) if d and Path(d).exists() else None


def tiny_config(**overrides):
    """configs/tiny.yaml with overrides (dotted keys), W&B offline."""
    from hh_ray.config import load_config

    return load_config(ROOT / "configs" / "tiny.yaml", {"tracking.wandb": "offline", **overrides})


@pytest.fixture(scope="session")
def tiny_pm(ray_cluster, tiny_model, tmp_path_factory):
    """A PM trained on the synthetic comparisons with the tiny backbone (~1 minute), shared by the session."""
    from learners.pm_learner import train_pm

    return str(train_pm(tiny_config(), tmp_path_factory.mktemp("pm-run")))
