"""The RLHF loop end to end on a real local Ray cluster: vLLM generation actors,
the PM service and a Ray Train PPO learner group, with the tiny model."""

import math

import pytest

from hh_ray.config import ConfigError
from hh_ray.controller import RLHFController, train_ppo
from hh_ray.tracking import read_metrics
from tests.conftest import tiny_config

# Settings under which the tiny policy measurably learns the synthetic PM's rule.
LEARN = {"ppo.lr": 0.002, "ppo.epochs": 2, "ppo.rollout_batch_size": 32, "ppo.minibatch_size": 16}


def test_reward_rises_with_two_generators_and_two_learners(tiny_pm, tmp_path):
    cfg = tiny_config(**LEARN, **{"model.pm": tiny_pm, "ppo.iterations": 10, "ppo.checkpoint_every": 5,
                                  "generation.num_workers": 2, "ppo.num_learners": 2})
    result = train_ppo(cfg, tmp_path)
    rows = read_metrics(tmp_path, "ppo")
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["policy_version"] for r in rows] == list(range(1, 11))
    assert all(r["staleness"] == 0 for r in rows)  # sync mode is on-policy
    kl = rows[-1]["kl"]
    assert math.isfinite(kl) and kl > 0
    before, after = result["reward_pm_heldout_before"], result["reward_pm_heldout_after"]
    print(f"held-out PM reward {before:.4f} -> {after:.4f}, final KL {kl:.4f}")
    assert after > before + 0.1
    for name in ("policy", "critic"):
        assert (tmp_path / name / "config.json").exists()
    assert (tmp_path / "reward_vs_sqrt_kl.png").exists()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    # the final policy is a normal HF folder
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "policy")


def test_resume_gives_the_same_metrics(tiny_pm, tmp_path):
    """Stop after 2 iterations, resume to 4: iterations 3-4 match an uninterrupted run."""
    base = {"model.pm": tiny_pm, "ppo.checkpoint_every": 2, **LEARN}
    train_ppo(tiny_config(**base, **{"ppo.iterations": 4}), tmp_path / "straight")
    train_ppo(tiny_config(**base, **{"ppo.iterations": 2}), tmp_path / "stopped")
    train_ppo(tiny_config(**base, **{"ppo.iterations": 4}), tmp_path / "stopped", resume=True)
    want = read_metrics(tmp_path / "straight", "ppo")[2:]
    got = [r for r in read_metrics(tmp_path / "stopped", "ppo") if r["step"] > 2]
    assert [r["step"] for r in got] == [3, 4]
    for w, g in zip(want, got):
        assert g["reward_pm"] == pytest.approx(w["reward_pm"], abs=1e-5)
        assert g["tokens_generated"] == w["tokens_generated"]
        for k in ("kl", "policy_loss", "value_loss", "entropy"):
            assert g[k] == pytest.approx(w[k], abs=1e-4), k


def test_async_mode_overlaps_with_staleness_one(tiny_pm, tmp_path):
    cfg = tiny_config(**{"model.pm": tiny_pm, "ppo.iterations": 3, "ppo.mode": "async"})
    train_ppo(cfg, tmp_path)
    rows = read_metrics(tmp_path, "ppo")
    assert [r["staleness"] for r in rows] == [0, 1, 1]


@pytest.mark.parametrize("overrides,msg", [
    ({"ppo.num_learners": 3}, "divide by ppo.num_learners"),
    ({"model.policy": "/no/such/model"}, "no such folder"),
    ({"model.pm": ""}, "no preference model"),
])
def test_bad_config_fails_before_any_actor(tiny_pm, tmp_path, overrides, msg):
    cfg = tiny_config(**{"model.pm": tiny_pm, **overrides})
    with pytest.raises((ConfigError, ValueError), match=msg):
        RLHFController(cfg, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_pm_with_another_tokenizer_is_refused_for_critic_init(tiny_pm, tmp_path, cache_dir):
    from hh_ray.models import build_tiny_model

    other = build_tiny_model(tmp_path / "other-vocab", seed=1)
    # a tokenizer trained on different text has different ids
    from transformers import AutoTokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["zebra quartz " * 50, "entirely different text"],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(other)
    assert AutoTokenizer.from_pretrained(other).get_vocab() != AutoTokenizer.from_pretrained(tiny_pm).get_vocab()
    cfg = tiny_config(**{"model.pm": tiny_pm, "model.policy": str(other)})
    with pytest.raises(ConfigError, match="tokenizer"):
        RLHFController(cfg, tmp_path / "run")
