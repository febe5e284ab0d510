"""PM training on a real local Ray cluster with the tiny model.

One uninterrupted run is shared (module fixture): two DDP workers, gradient
accumulation, a PMP stage then finetuning. It must learn the synthetic rule,
and a run stopped inside PMP and resumed must see exactly the same pairs and
end with the same weights. Three fits in all keep this file near 2 minutes.
"""

import json
import time
from pathlib import Path

import pytest
import torch

from hh_ray.checkpoint import latest_checkpoint
from hh_ray.config import load_config
from hh_ray.data import DataError, synthetic_comparisons, write_jsonl
from hh_ray.tracking import read_metrics
from learners.pm_learner import (build_stages, epoch_order, fresh_position, steps_per_epoch, train_pm,
                                 worker_micro_batches)

# PMP: 600 pairs = 18 steps of 32 + a tail of 24; finetune: 540 = 16 × 32 + 28; 60 held out.
OVERRIDES = {"data.num_synthetic": 600, "pm.pmp_source": "synthetic", "pm.pmp_lr": 0.002,
             "pm.num_workers": 2, "pm.grad_accum": 2, "pm.checkpoint_every": 10, "tracking.wandb": "disabled"}
PMP_STEPS, FINETUNE_STEPS, PAIRS = 19, 17, 600 + 540


def tiny_cfg(**more):
    return load_config("configs/tiny.yaml", {**OVERRIDES, **more})


@pytest.fixture(scope="module")
def full_run(ray_cluster, tiny_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pm-full")
    assert train_pm(tiny_cfg(), run_dir) == run_dir.resolve() / "pm"
    return run_dir


def _weights(pm_dir):
    from safetensors.torch import load_file

    return load_file(str(pm_dir / "model.safetensors"))


# ---------------------------------------------------------------- pure pieces

def test_data_order_is_a_function_of_seed_stage_epoch():
    assert epoch_order(50, 0, 1, 2) == epoch_order(50, 0, 1, 2)
    assert epoch_order(50, 0, 1, 2) != epoch_order(50, 0, 1, 3)
    assert sorted(epoch_order(50, 0, 0, 0)) == list(range(50))


def test_micro_batches_cover_the_step_once():
    batch = list(range(10, 26))
    parts = [ids for r in range(2) for ids in worker_micro_batches(batch, r, world=2, grad_accum=2)]
    assert sorted(i for p in parts for i in p) == batch and all(parts)
    # a tail smaller than workers × grad_accum would leave a worker idle (DDP hang): dropped
    assert steps_per_epoch(68, 16, 4) == 5 and steps_per_epoch(67, 16, 4) == 4


def test_a_pm_checkpoint_is_the_model_its_optimizer_and_the_position(tmp_path):
    from learners.kit import adamw, restore_checkpoint
    from learners.pm_learner import checkpoint, resume_point

    def net():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
        return m, adamw(m.parameters(), lr=1e-2)

    def step(m, opt, x):
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        opt.step()

    assert resume_point(tmp_path) == (None, fresh_position())
    a, opt_a = net()
    for i in range(3):
        step(a, opt_a, torch.full((2, 3), float(i)))
        checkpoint(tmp_path, a, opt_a, {**fresh_position(), "global_step": i + 1}, rank=0, keep=2)
    # the newest `keep` are kept; one folder per step, no pickles
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000003"]
    folder, pos = resume_point(tmp_path)
    assert folder.name == "step-000003" and pos["global_step"] == 3
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json", "model.optimizer.json", "model.optimizer.safetensors", "model.safetensors", "state.json"]
    b, opt_b = net()
    restore_checkpoint(folder, {"model": b}, {"model": opt_b})
    x = torch.randn(2, 3)
    step(a, opt_a, x)
    step(b, opt_b, x)  # Adam moments and step count must match for this to be equal
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------- training on Ray

def test_short_train_learns_the_synthetic_rule(full_run):
    results = json.loads((full_run / "pm_eval" / "pm_eval.json").read_text())
    assert results["n"] == 60
    assert results["accuracy"] > 0.9
    assert 0.0 <= results["ece"] <= 1.0
    assert read_metrics(full_run, "pm_eval")[0]["accuracy"] == results["accuracy"]


def _no_training(config):
    pass


def test_a_learner_group_on_a_cluster_started_here_starts_no_autoscaling_coordinator(ray_cluster, tmp_path):
    """learners.group.torch_trainer: no Ray Data actor asks an autoscaler that is not there for
    the workers' resources (a detached actor: it would live as long as the cluster)."""
    import ray
    from ray.train import RunConfig, ScalingConfig

    from learners.group import torch_trainer

    assert ray._private.worker._global_node.head  # the session's cluster was started by this process
    names = lambda: [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]  # noqa: E731
    if "AutoscalingCoordinator" in names():  # left by a test's process that joined this cluster (it may ask)
        ray.kill(ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator"))
        deadline = time.time() + 30
        while "AutoscalingCoordinator" in names() and time.time() < deadline:
            time.sleep(0.2)
    torch_trainer(_no_training, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                  run_config=RunConfig(storage_path=str(tmp_path))).fit()
    assert "AutoscalingCoordinator" not in names(), names()


def test_pmp_then_finetune_each_with_its_own_lr(full_run):
    pmp, fine = read_metrics(full_run, "pm_pmp"), read_metrics(full_run, "pm_finetune")
    assert [r["step"] for r in pmp + fine] == list(range(1, PMP_STEPS + FINETUNE_STEPS + 1))
    assert {r["lr"] for r in pmp} == {0.002} and {r["lr"] for r in fine} == {0.001}
    assert pmp[-1]["batch_pairs"] == 24 and fine[-1]["batch_pairs"] == 28  # tails kept, none dropped
    assert fine[-1]["examples_seen"] == PAIRS
    assert pmp[-1]["loss"] < pmp[0]["loss"]


def test_the_precision_auto_chose_is_printed_and_in_config_yaml(full_run):
    import yaml

    from hh_ray.runtime import resolve_autocast

    saved = yaml.safe_load((full_run / "config.yaml").read_text())
    assert saved["pm"]["autocast"] == resolve_autocast("auto")[0] != "auto"


def test_the_learners_auto_precision_is_measured_on_a_learners_node(ray_cluster, tmp_path, monkeypatch, capsys):
    """The probe runs in a Ray task that asks for a learner's resources, not in the driver (which
    may be a head node with another processor, or without the learners' GPUs)."""
    from hh_ray import runtime
    from learners import group

    cfg = tiny_cfg(**{"model.cache_dir": str(tmp_path), "ppo.autocast": "auto"})
    monkeypatch.setattr(runtime, "_matmul_seconds", lambda *a, **k: pytest.fail("probed in the driver"))
    got = group.with_learner_autocast(cfg, "ppo.autocast", {"CPU": 1})
    assert "measured on a learner's node" in capsys.readouterr().out
    # the task cached what it measured: the driver now reads the same choice without probing
    assert got.ppo.autocast == runtime.resolve_autocast("auto", str(tmp_path))[0] != "auto"
    assert len(json.loads((tmp_path / "cpu_matmul.json").read_text())) == 1

    # No node has a learner's resources free: the driver decides by its own (cached) probe,
    # or bf16 for learners that get GPUs, and says so.
    monkeypatch.setattr(group, "PROBE_TIMEOUT_S", 1.0)
    assert group.with_learner_autocast(cfg, "ppo.autocast", {"CPU": 1, "no_such_node": 1}).ppo.autocast \
        == got.ppo.autocast
    assert group.with_learner_autocast(cfg, "ppo.autocast", {"CPU": 1, "GPU": 1}).ppo.autocast == "bfloat16"
    assert capsys.readouterr().out.count("decided by the driver") == 2


def test_a_lora_pm_trains_adapters_and_saves_a_plain_merged_pm(ray_cluster, tiny_model, tmp_path):
    """model.lora_rank on the PM: adapters and the score head train, the backbone's own weights
    stay, and the saved PM is a plain folder (adapters merged) that loads and scores as any PM."""
    from safetensors.torch import load_file

    from hh_ray.models import load_scalar_head_model
    from hh_ray.pm_eval import accuracy, score_comparisons

    cfg = load_config("configs/tiny.yaml", {"data.num_synthetic": 400, "model.lora_rank": 8, "pm.lr": 0.003,
                                            "pm.checkpoint_every": 1000, "tracking.wandb": "disabled"})
    pm_dir = train_pm(cfg, tmp_path)
    saved = load_file(str(pm_dir / "model.safetensors"))
    initial = load_file(str(next(Path(tiny_model).glob("*.safetensors"))))
    assert not [k for k in saved if "lora" in k or "modules_to_save" in k]
    assert torch.equal(saved["model.embed_tokens.weight"][: len(initial["model.embed_tokens.weight"])],
                       initial["model.embed_tokens.weight"])  # not a LoRA target: unchanged
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(saved[q], initial[q])  # the adapter merged into the linear layer
    loss = [r["loss"] for r in read_metrics(tmp_path, "pm_finetune")]
    assert sum(loss[-3:]) < sum(loss[:3])
    model, tok = load_scalar_head_model(str(pm_dir))
    held_out = synthetic_comparisons(64, seed=11)
    assert accuracy(*score_comparisons(model, tok, held_out, 128)) > 0.6


def test_pm_folder_loads_as_is_and_scores_at_end_of_context(full_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hh_ray.models import encode_for_pm, pm_scores

    pm_dir = full_run / "pm"
    model = AutoModelForSequenceClassification.from_pretrained(pm_dir).eval()
    tok = AutoTokenizer.from_pretrained(pm_dir)
    c = synthetic_comparisons(2, seed=7)
    enc = encode_for_pm(tok, [c[0].prompt + c[0].chosen, c[1].prompt + c[1].rejected], 128)
    with torch.no_grad():
        hf = model(**enc).logits.squeeze(-1)
        ours = pm_scores(model, enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(hf, ours, atol=1e-5)


def test_resume_sees_the_same_pairs_as_an_uninterrupted_run(full_run, tmp_path):
    cfg = tiny_cfg()
    ckpt = train_pm(cfg, tmp_path, stop_after_steps=12)  # inside PMP, two steps after a checkpoint
    assert ckpt.name == "step-000012" and not (tmp_path / "pm").exists()
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("step-*"))] == ["step-000010", "step-000012"]
    with pytest.raises(ValueError, match="--resume"):
        train_pm(cfg, tmp_path)  # a fresh run would silently start over
    assert train_pm(cfg, tmp_path, resume=True) == tmp_path.resolve() / "pm"

    def steps(run):
        return read_metrics(run, "pm_pmp") + read_metrics(run, "pm_finetune")

    full, resumed = steps(full_run), steps(tmp_path)
    assert [r["step"] for r in resumed] == list(range(1, PMP_STEPS + FINETUNE_STEPS + 1))  # none twice
    assert [r["batch_digest"] for r in resumed] == [r["batch_digest"] for r in full]
    done_full, done_resumed = read_metrics(full_run, "pm_done")[-1], read_metrics(tmp_path, "pm_done")[-1]
    assert done_resumed["examples_seen"] == done_full["examples_seen"] == PAIRS
    assert done_resumed["seen_digest"] == done_full["seen_digest"]
    # model and optimizer state came back exactly: the weights end where the uninterrupted run's did
    a, b = _weights(full_run / "pm"), _weights(tmp_path / "pm")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


# ---------------------------------------------------------------- bad input

def _write(tmp_path, records):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_identical_pairs_are_skipped_with_a_count(tmp_path):
    good = synthetic_comparisons(30, seed=3)
    write_jsonl(good, tmp_path / "train.jsonl")
    same = good[0].prompt + good[0].chosen
    with open(tmp_path / "train.jsonl", "a") as f:
        f.write(json.dumps({"chosen": same, "rejected": same}) + "\n")
    stages, held_out, counts = build_stages(tiny_cfg(**{"data.source": str(tmp_path / "train.jsonl")}))
    assert counts == {"identical": 1}
    assert len(stages[-1]["comparisons"]) + len(held_out) == 30


def test_empty_dataset_is_refused_before_any_worker_starts(tmp_path):
    with pytest.raises(DataError, match="no comparisons"):
        train_pm(tiny_cfg(**{"data.source": _write(tmp_path, [])}), tmp_path / "run")
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is None


def test_over_long_transcripts_are_cut_from_the_left_keeping_end_of_context(tiny_model):
    from hh_ray.models import END_OF_CONTEXT, encode_for_pm, load_pm_tokenizer
    from learners.pm_learner import count_truncated

    tok = load_pm_tokenizer(tiny_model)
    c = synthetic_comparisons(1, seed=5)[0]
    long_prompt = "\n\nHuman: " + "tell me about chess " * 100 + "\n\nAssistant:"
    enc = encode_for_pm(tok, [long_prompt + c.chosen], max_len=32)
    ids = enc["input_ids"][0].tolist()
    assert len(ids) == 32 and ids[-1] == tok.convert_tokens_to_ids(END_OF_CONTEXT)
    assert tok.decode(ids[:-1]).endswith(c.chosen)  # the response survives, the old context goes
    from hh_ray.data import Comparison

    assert count_truncated(tok, [Comparison(long_prompt, c.chosen, c.rejected), c], 32) == 2


def test_bad_settings_are_refused_with_the_field_name(tmp_path):
    with pytest.raises(ValueError, match="pm.batch_size"):
        train_pm(tiny_cfg(**{"pm.batch_size": 30, "pm.num_workers": 2, "pm.grad_accum": 2}), tmp_path)
    with pytest.raises(ValueError, match="--resume"):
        train_pm(tiny_cfg(), tmp_path, resume=True)
