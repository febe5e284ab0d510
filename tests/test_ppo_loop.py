"""The RLHF loop end to end on a real local Ray cluster: vLLM generation actors,
the PM service and a Ray Train PPO learner group, with the tiny model."""

import json
import math
import time

import pytest

from hh_ray.config import ConfigError
from hh_ray.orchestration.controller import RLHFController, train_ppo
from hh_ray.tracking import read_metrics
from tests.conftest import tiny_config

# Settings under which the tiny policy measurably learns the synthetic PM's rule.
LEARN = {"ppo.lr": 0.002, "ppo.epochs": 2, "ppo.rollout_batch_size": 32, "ppo.minibatch_size": 16}


# 2 generation actors, the PM service and 2 learner workers.
SYSTEM = {"generation.num_workers": 2, "ppo.num_learners": 2, "ppo.checkpoint_every": 2}


@pytest.fixture(scope="module")
def full_run(tiny_pm, tmp_path_factory):
    """One uninterrupted 10-iteration run, shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("ppo-full")
    result = train_ppo(tiny_config(**LEARN, **SYSTEM, **{"model.pm": tiny_pm, "ppo.iterations": 10}), run_dir)
    return run_dir, result


def test_reward_rises_with_two_generators_and_two_learners(full_run):
    run_dir, result = full_run
    rows = read_metrics(run_dir, "ppo")
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["policy_version"] for r in rows] == list(range(1, 11))
    assert all(r["staleness"] == 0 for r in rows)  # sync mode is on-policy
    kl = rows[-1]["kl"]
    assert math.isfinite(kl) and kl > 0
    before, after = result["reward_pm_heldout_before"], result["reward_pm_heldout_after"]
    print(f"held-out PM reward {before:.4f} -> {after:.4f}, final KL {kl:.4f}")
    assert after > before + 0.1
    for name in ("policy", "critic"):
        assert (run_dir / name / "config.json").exists()
    # weight_sync=auto broadcast the weights, and the run recorded where everything ran
    assert all(r["sync_bytes"] > 0 for r in rows) and rows[0]["time_sync_connect"] > 0
    assert all(r["time_sync_connect"] == 0 for r in rows[1:])  # one group for the whole run
    [placement] = read_metrics(run_dir, "placement")
    assert len(placement["generation"]) == 2 and len(placement["learners"]) == 2 and placement["pm"]["node_id"]
    assert all(r["device"] == "cpu" for r in placement["learners"])
    # fp32 learners and the generators run on jemalloc (runtime.worker_env; bf16 learners: below)
    assert [r["malloc"] for r in placement["learners"]] == ["jemalloc", "jemalloc"]
    assert [g["malloc"] for g in placement["generation"]] == ["jemalloc", "jemalloc"]
    assert (run_dir / "reward_vs_sqrt_kl.png").exists()
    assert list((run_dir / "wandb").glob("offline-run-*"))
    # the final policy is a normal HF folder, which records the format it was trained in
    from transformers import AutoModelForCausalLM

    from hh_ray.conversation import read_format

    AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    assert read_format(run_dir / "policy") == read_format(run_dir / "critic") == "hh"
    assert all(0 <= r["ended_fraction"] <= 1 for r in rows)
    # samples.jsonl: the first rollouts of every iteration, with their KL, in the HH format
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [k for k in range(1, 11) for _ in range(4)]
    for s in samples:
        assert s["finish_reason"] in ("stop", "length") and math.isfinite(s["kl"]) and "\n\nHuman:" not in s["response"]
        assert s["prompt"].endswith("\n\nAssistant:") and s["policy_version"] == s["step"] - 1


def test_fused_value_pass_gives_the_same_update(tiny_pm, tmp_path):
    """One epoch over one minibatch: the critic's old values taken from its training
    forward (ppo.fuse_value_pass) give the same iterations as a separate no-grad pass.
    In float32, where only the micro-batch grouping differs; bfloat16 autocast then
    stays close to float32 (it moves log-probs by ~0.03 nats per token)."""
    base = {"model.pm": tiny_pm, "ppo.iterations": 2, "ppo.epochs": 1, "ppo.rollout_batch_size": 16,
            "ppo.minibatch_size": 16, "ppo.checkpoint_every": 10}
    runs = {"fused": {"ppo.fuse_value_pass": True}, "separate": {"ppo.fuse_value_pass": False},
            "bf16": {"ppo.fuse_value_pass": True, "ppo.autocast": "bfloat16"}}
    rows = {}
    for name, extra in runs.items():
        train_ppo(tiny_config(**base, **extra), tmp_path / name)
        rows[name] = read_metrics(tmp_path / name, "ppo")
    keys = ("value_loss", "policy_loss", "reward_pm", "kl", "approx_kl")
    for a, b, c in zip(rows["fused"], rows["separate"], rows["bf16"]):
        for key in keys:
            assert math.isfinite(a[key]) and a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        assert c["value_loss"] == pytest.approx(a["value_loss"], rel=0.05)
        assert c["reward_pm"] == pytest.approx(a["reward_pm"], abs=0.05)
    # a learner in bf16 on a CPU trains on glibc with huge pages, in fp32 on jemalloc (runtime.worker_env)
    malloc = {name: read_metrics(tmp_path / name, "placement")[0]["learners"][0]["malloc"] for name in runs}
    assert malloc == {"fused": "jemalloc", "separate": "jemalloc", "bf16": "glibc"}


def test_resume_gives_the_same_metrics(full_run, tiny_pm, tmp_path):
    """Stop after 2 iterations, resume to 4: iterations 3-4 match the uninterrupted run.
    (The LR schedule is constant, so a shorter run is the same run cut short.)"""
    base = {"model.pm": tiny_pm, **LEARN, **SYSTEM}
    # A PM trained in the same folder (as the demo does) keeps its checkpoints apart from PPO's.
    from hh_ray.checkpoint import checkpoint_dir, write_checkpoint

    write_checkpoint(checkpoint_dir(tmp_path / "checkpoints", 99), {}, {}, {"global_step": 99})
    train_ppo(tiny_config(**base, **{"ppo.iterations": 2}), tmp_path)
    train_ppo(tiny_config(**base, **{"ppo.iterations": 4}), tmp_path, resume=True)
    want = read_metrics(full_run[0], "ppo")[2:4]
    got = [r for r in read_metrics(tmp_path, "ppo") if r["step"] > 2]
    assert [r["step"] for r in got] == [3, 4]
    for w, g in zip(want, got):
        assert g["reward_pm"] == pytest.approx(w["reward_pm"], abs=1e-5)
        assert g["tokens_generated"] == w["tokens_generated"]
        for k in ("kl", "policy_loss", "value_loss", "entropy"):
            assert g[k] == pytest.approx(w[k], abs=1e-4), k


def test_object_store_sync_gives_the_same_run(full_run, tiny_pm, tmp_path):
    """The same weights, whichever way they travel: the object-store run samples and learns
    exactly what the broadcast run did."""
    train_ppo(tiny_config(**{"model.pm": tiny_pm, **LEARN, **SYSTEM, "ppo.iterations": 3,
                             "generation.weight_sync": "object_store"}), tmp_path)
    want, got = read_metrics(full_run[0], "ppo")[:3], read_metrics(tmp_path, "ppo")
    assert "sync_bytes" not in got[0]
    for w, g in zip(want, got):
        assert g["tokens_generated"] == w["tokens_generated"]
        for k in ("reward_pm", "kl", "policy_loss", "value_loss"):
            assert g[k] == pytest.approx(w[k], abs=1e-4), k


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_estimators_raise_the_reward_without_a_critic(tiny_pm, tmp_path, estimator):
    """4 samples per prompt kept together as groups over 2 learners; no critic anywhere."""
    # 8 prompts x 4 samples per iteration: fewer prompts than PPO's 32, so a higher LR
    cfg = tiny_config(**{"model.pm": tiny_pm, **LEARN, **SYSTEM, "ppo.lr": 0.004, "ppo.iterations": 12,
                         "ppo.checkpoint_every": 6, "ppo.advantage_estimator": estimator,
                         "generation.samples_per_prompt": 4})
    result = train_ppo(cfg, tmp_path)
    before, after = result["reward_pm_heldout_before"], result["reward_pm_heldout_after"]
    print(f"{estimator}: held-out PM reward {before:.4f} -> {after:.4f}")
    assert after > before + 0.1
    rows = read_metrics(tmp_path, "ppo")
    assert all(r["samples"] == 32 and "value_loss" not in r for r in rows)
    assert (tmp_path / "policy" / "config.json").exists() and not (tmp_path / "critic").exists()
    from hh_ray.checkpoint import PPO_CHECKPOINTS, latest_checkpoint

    assert not list(latest_checkpoint(tmp_path / PPO_CHECKPOINTS).glob("critic*"))
    # the logged samples (rank 0's first rows) are the 4 answers to one prompt
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len({s["prompt"] for s in samples if s["step"] == 1}) == 1


def test_lora_trains_adapters_syncs_merged_weights_and_resumes(tiny_pm, tmp_path):
    """model.lora_rank: adapters only in the checkpoints, merged weights in the generators and
    in policy/, pi0 = the base with the adapters off; a resumed run equals an uninterrupted one."""
    base = {"model.pm": tiny_pm, **LEARN, "ppo.lr": 0.01, "ppo.checkpoint_every": 2, "model.lora_rank": 4}
    full, part = tmp_path / "full", tmp_path / "part"
    train_ppo(tiny_config(**base, **{"ppo.iterations": 4}), full)
    rows = read_metrics(full, "ppo")
    # the first batch is sampled by pi0 itself (KL exactly 0); the next by the merged policy
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-5) and abs(rows[1]["kl"]) > 1e-4
    from safetensors import safe_open

    from hh_ray.checkpoint import PPO_CHECKPOINTS, latest_checkpoint, read_state

    ckpt = latest_checkpoint(full / PPO_CHECKPOINTS)
    with safe_open(str(ckpt / "policy.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n for n in names)
    assert read_state(ckpt)["lora"]["rank"] == 4
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(full / "policy")  # merged: a plain HF model
    assert not any("lora" in n for n, _ in plain.named_parameters())

    train_ppo(tiny_config(**base, **{"ppo.iterations": 2}), part)
    train_ppo(tiny_config(**base, **{"ppo.iterations": 4}), part, resume=True)
    got = [r for r in read_metrics(part, "ppo") if r["step"] > 2]
    assert [r["step"] for r in got] == [3, 4]
    for w, g in zip(rows[2:4], got):
        for k in ("reward_pm", "kl", "policy_loss", "value_loss"):
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
    with pytest.raises((ConfigError, ValueError), match=msg):  # when the config is read, or as the run starts
        RLHFController(tiny_config(**{"model.pm": tiny_pm, **overrides}), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_an_engine_that_cannot_start_stops_the_actors_started_beside_it(tiny_pm, tmp_path):
    """The engines, the PM service and the learners start together; an engine that fails (a
    max_seq_len beyond the model's positions) fails the run's start, and the PM service, the
    learner group and the channel actor that started meanwhile are stopped with it, not left
    running in the cluster."""
    import ray

    def alive() -> dict[str, str]:
        return {k: a["ActorClassName"] for k, a in ray._private.state.actors().items() if a["State"] == "ALIVE"}

    before = alive()
    with pytest.raises(ray.exceptions.RayActorError, match="max_model_len"):
        RLHFController(tiny_config(**{"model.pm": tiny_pm, "model.max_seq_len": 4096}), tmp_path)
    deadline = time.time() + 60
    while alive().keys() - before.keys() and time.time() < deadline:  # ray.kill returns before the actor is gone
        time.sleep(0.5)
    left = sorted(name for k, name in alive().items() if k not in before)
    assert not left, left


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


def test_chat_format_end_to_end_on_a_chat_template_model(ray_cluster, tiny_chat_model, tmp_path):
    """A policy whose tokenizer has a chat template: the PM is trained on chat-rendered
    conversations, PPO renders its prompts the same way and ends rollouts at the
    end-of-turn token, and every folder written records the 'chat' format."""
    from hh_ray.conversation import read_format
    from learners.pm_learner import train_pm

    cfg = tiny_config(**{"model.policy": tiny_chat_model, "data.num_synthetic": 200, "generation.max_new_tokens": 48})
    pm = train_pm(cfg, tmp_path / "pm-run")
    assert read_format(pm) == "chat"
    run = tmp_path / "ppo"
    train_ppo(tiny_config(**{"model.policy": tiny_chat_model, "model.pm": str(pm), "ppo.iterations": 2,
                             "ppo.rollout_batch_size": 16, "ppo.minibatch_size": 16, "ppo.eval_prompts": 0,
                             "generation.max_new_tokens": 48}), run)
    assert read_format(run / "policy") == "chat"
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["conversation_format"] == "chat"
    rows = read_metrics(run, "ppo")
    assert len(rows) == 2 and all(0 < r["ended_fraction"] <= 1 for r in rows)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and all("<|im_end|>" not in s["response"] and "<|im_start|>" not in s["response"] for s in samples)
    # the HH-format PM of the other tests cannot score this policy's conversations
    with pytest.raises(ConfigError, match="format"):
        RLHFController(tiny_config(**{"model.policy": tiny_chat_model, "model.pm": str(pm),
                                      "model.conversation_format": "hh"}), tmp_path / "refused")
