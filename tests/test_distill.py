"""Context distillation and SFT: the top-k + rest KL by hand, the teacher's prompt cache,
the cache format, and real runs on a local Ray cluster with the tiny model.

Four fits in all (distillation through the CLI with 2 workers and the cached
teacher; the online teacher stopped after 2 steps and resumed; SFT) keep this
file near 2.5 minutes on a quiet machine.
"""

import json
import math

import pytest
import torch

from hh_ray.orchestration.cli import build_parser, main, resolve
from hh_ray.distill import (cache_is_valid, cache_meta, load_cache, load_corpus, log1mexp, loss_mask, loss_tokens,
                            pad_rows, prompt_kv, read_prompt, save_shard, sft_example, teacher_logits, teacher_rows,
                            teacher_topk, topk_kl, write_meta)
from hh_ray.tracking import read_metrics
from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")


# ---------------------------------------------------------------- the math, by hand

def test_topk_kl_by_hand():
    # teacher p = (.5, .3, .15, .05), student uniform; k = 2 keeps tokens 0 and 1, the rest bucket holds .2 vs .5
    p = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    q = torch.full((4,), 0.25).log()
    ids, top, rest = teacher_topk(p, 2)
    assert ids.tolist() == [0, 1] and math.isclose(rest.exp().item(), 0.2, rel_tol=1e-6)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)  # 0.218013
    assert topk_kl(q, ids, top, rest).item() == pytest.approx(expected, abs=1e-6)
    # coarse-graining lowers KL: the full KL is 0.244175
    full = (p.exp() * (p - q)).sum().item()
    assert full == pytest.approx(0.244175, abs=1e-6) and topk_kl(q, ids, top, rest).item() < full


def _direct_bucket_kl(p: torch.Tensor, q: torch.Tensor, k: int) -> float:
    """KL over {top-k tokens of p} ∪ {everything else}, built bucket by bucket in plain Python."""
    order = sorted(range(len(p)), key=lambda i: -float(p[i]))[:k]
    others = [i for i in range(len(p)) if i not in order]  # no rest bucket when k covers the vocabulary
    pb = [float(p[i]) for i in order] + ([sum(float(p[i]) for i in others)] if others else [])
    qb = [float(q[i]) for i in order] + ([sum(float(q[i]) for i in others)] if others else [])
    return sum(a * math.log(a / b) for a, b in zip(pb, qb) if a > 0)


@pytest.mark.parametrize("k", [1, 4, 10, 11, 50])
def test_topk_kl_matches_direct_computation(k):
    torch.manual_seed(k)
    t_logits, s_logits = torch.randn(3, 5, 11) * 2, torch.randn(3, 5, 11) * 2
    s_logp = s_logits.double().log_softmax(-1).requires_grad_(True)
    ids, top, rest = teacher_topk(t_logits.double(), k)
    kl = topk_kl(s_logp, ids, top, rest)
    p, q = t_logits.double().softmax(-1), s_logits.double().softmax(-1)
    for b in range(3):
        for t in range(5):
            assert kl[b, t].item() == pytest.approx(_direct_bucket_kl(p[b, t], q[b, t], k), abs=1e-5)
    full = (p * (p.log() - q.log())).sum(-1)
    assert (kl <= full + 1e-6).all()
    if k >= 10:  # at most one token in the rest bucket: nothing is lost
        assert torch.allclose(kl, full, atol=1e-5)
    kl.sum().backward()  # an empty rest bucket (k >= V) must not poison the gradient
    assert torch.isfinite(s_logp.grad).all()


def test_log1mexp_is_accurate_at_both_ends():
    x = torch.tensor([-1e-6, -0.5, -3.0, -40.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-6)
    assert torch.isfinite(log1mexp(torch.tensor([0.0, 1e-3]))).all()  # rounding above 0 stays finite


def test_sft_example_trains_only_on_the_response_and_eos():
    e = sft_example([1, 2, 3], [7, 8], eos_id=0, max_len=16)
    assert e == {"ids": [1, 2, 3, 7, 8, 0], "start": 3}
    # targets are ids[1:]; the loss covers 7, 8 and EOS, nothing of the prompt
    m = loss_mask([e, {"ids": [5, 6, 7]}], width=6)
    assert m.tolist() == [[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]] and loss_tokens(e) == 3
    # too long: the prompt loses its start, the response stays whole
    assert sft_example([1, 2, 3, 4, 5], [7, 8], 0, max_len=5) == {"ids": [4, 5, 7, 8, 0], "start": 2}
    assert sft_example([1, 2], [7, 8, 9, 10, 11], 0, max_len=4) == {"ids": [2, 7, 8, 9], "start": 1}


# ---------------------------------------------------------------- the teacher and its cache (no Ray)

@pytest.fixture(scope="module")
def tiny_lm(tiny_model):
    from hh_ray.models import load_policy, load_tokenizer

    return load_policy(tiny_model).eval(), load_tokenizer(tiny_model)


def test_prompt_cache_gives_the_full_forward(tiny_lm):
    model, tok = tiny_lm
    prompt = tok(read_prompt(), add_special_tokens=False)["input_ids"][-64:]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in load_corpus("synthetic", 3)]
    ids, mask = pad_rows(rows, tok.pad_token_id)
    cached = teacher_logits(model, prompt_kv(model, prompt), ids, mask)
    for i, r in enumerate(rows):  # rows differ in length: padding must not shift positions
        with torch.no_grad():
            full = model(input_ids=torch.tensor([prompt + r])).logits[0, len(prompt):]
        assert torch.allclose(cached[i, : len(r)], full, atol=1e-4)
    # and the prompt matters: without it the predictions differ
    with torch.no_grad():
        bare = model(input_ids=ids[:1]).logits[0, : len(rows[0])]
    assert (bare - cached[0, : len(rows[0])]).abs().max() > 1e-3


def test_teacher_cache_round_trip(tiny_lm, tmp_path):
    model, tok = tiny_lm
    examples = [{"ids": tok(t, add_special_tokens=False)["input_ids"]} for t in load_corpus("synthetic", 5)]
    kv = prompt_kv(model, [1, 2, 3])
    for shard in (0, 1):  # two writers, interleaved examples, as two workers write them
        mine = list(range(shard, 5, 2))
        save_shard(tmp_path, shard, mine, teacher_rows(model, kv, [examples[i] for i in mine], tok.pad_token_id, 7))
    meta = cache_meta("m", [1, 2, 3], 7, examples)
    assert not cache_is_valid(tmp_path, meta)  # no meta.json yet: incomplete
    write_meta(tmp_path, meta, shards=2)
    assert cache_is_valid(tmp_path, meta) and not cache_is_valid(tmp_path, cache_meta("m", [1, 2, 4], 7, examples))
    cache = load_cache(tmp_path)
    direct = teacher_rows(model, kv, examples, tok.pad_token_id, 7)
    for i, e in enumerate(examples):
        assert cache[i][0].shape == (len(e["ids"]) - 1, 7)
        for a, b in zip(cache[i], direct[i]):
            assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_corpus_errors_name_the_file(tmp_path):
    from hh_ray.data import DataError

    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_corpus(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": 3}\n')
    with pytest.raises(DataError, match=r"corpus.jsonl:2: no string field"):
        load_corpus(str(bad))
    txt = tmp_path / "corpus.txt"
    txt.write_text("\\n\\nHuman: hi\\n\\nAssistant: hello\n\nsecond text\n")
    assert load_corpus(str(txt)) == ["\n\nHuman: hi\n\nAssistant: hello", "second text"]


def test_cli_missing_corpus_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no-such-corpus.jsonl"
    rc = main(["distill", "--config", TINY, "--run-dir", str(tmp_path / "run"), f"distill.corpus={missing}"])
    assert rc == 2 and str(missing) in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_refuses_a_prompt_longer_than_the_model_reads(tmp_path, capsys):
    # the whole shipped prompt is ~2,500 tiny-BPE tokens; the tiny model has 1,024 positions
    rc = main(["distill", "--config", TINY, "--run-dir", str(tmp_path), "distill.max_prompt_tokens=0"])
    err = capsys.readouterr().err
    assert rc == 2 and "1024 positions" in err and "distill.max_prompt_tokens" in err
    assert main(["distill", "--config", TINY, "--run-dir", str(tmp_path), "distill.teacher=sometimes"]) == 2
    assert "distill.teacher" in capsys.readouterr().err
    assert main(["distill", "--config", TINY, "--run-dir", str(tmp_path), "distill.top_k=0"]) == 2
    assert "distill.top_k" in capsys.readouterr().err and not (tmp_path / "config.yaml").exists()


# ---------------------------------------------------------------- real runs on Ray

# fp32 (distill.autocast=none): the resume test compares 1 and 2 workers step for step, which
# holds to float summation order only; bf16 rounding would differ by more.
DISTILL = ["distill.num_texts=320", "distill.num_workers=2", "distill.checkpoint_every=8", "distill.autocast=none",
           "tracking.wandb=offline"]


@pytest.fixture(scope="module")
def distill_run(ray_cluster, tiny_model, tmp_path_factory):
    run = tmp_path_factory.mktemp("distill")
    assert main(["distill", "--config", TINY, "--run-dir", str(run), *DISTILL]) == 0
    return run


def test_distillation_brings_the_student_closer_to_the_teacher(distill_run):
    (before,) = [r["heldout_kl"] for r in read_metrics(distill_run, "distill_eval") if r["when"] == "before"]
    (after,) = [r["heldout_kl"] for r in read_metrics(distill_run, "distill_eval") if r["when"] == "after"]
    # The prompt moves the tiny random model's predictions only a little (KL ~1e-3 per token),
    # but distillation must remove most of that gap on text it never trained on.
    assert before > 1e-4 and after < 0.5 * before
    steps = read_metrics(distill_run, "distill")
    assert len(steps) == 288 // 16 and steps[-1]["kl"] < steps[0]["kl"]
    teacher = read_metrics(distill_run, "distill_teacher")
    assert len(teacher) == 1 and teacher[0]["sequences"] == 288 + 32


def test_distill_run_folder_and_policy(distill_run):
    from transformers import AutoModelForCausalLM

    for name in ("config.yaml", "metrics.jsonl", "wandb", "checkpoints", "policy", "distill_eval.json"):
        assert (distill_run / name).exists(), name
    meta = json.loads((distill_run / "teacher_cache" / "meta.json").read_text())
    assert meta["shards"] == 2 and meta["top_k"] == 50 and meta["examples"] == 288 + 32
    assert (distill_run / "checkpoints" / "step-000016" / "state.json").exists()
    model = AutoModelForCausalLM.from_pretrained(distill_run / "policy")
    assert model.num_parameters() > 0


def test_train_ppo_accepts_the_distilled_policy(distill_run, tmp_path):
    """`train-ppo --model.policy RUN/policy`: the checks that run before any actor starts."""
    from hh_ray.orchestration.controller import check_config, resolve_paths
    from hh_ray.models import load_scalar_head_model, save_model

    pm, pm_tok = load_scalar_head_model(str(distill_run / "policy"))  # a PM on the distilled backbone
    save_model(pm, pm_tok, tmp_path / "pm")
    args = build_parser().parse_args(["train-ppo", "--config", TINY, "--model.policy", str(distill_run / "policy"),
                                      "--model.pm", str(tmp_path / "pm")])
    cfg, _ = resolve(args)
    policy, pm_path = resolve_paths(cfg)
    assert policy == str((distill_run / "policy").resolve())
    check_config(cfg, policy, pm_path)  # critic_init=pm: same vocabulary as the policy


def test_online_teacher_and_resume_give_the_same_steps_as_the_cache(distill_run, tmp_path):
    from hh_ray.config import load_config
    from learners.distill_learner import train_policy_init

    overrides = dict(kv.split("=", 1) for kv in DISTILL)
    cfg = load_config(TINY, {**overrides, "distill.teacher": "online", "distill.num_workers": 1,
                             "tracking.wandb": "disabled"})
    ckpt = train_policy_init(cfg, tmp_path, "distill", stop_after_steps=2)
    assert ckpt.name == "step-000002" and not (tmp_path / "teacher_cache").exists()
    assert train_policy_init(cfg, tmp_path, "distill", resume=True) == tmp_path.resolve() / "policy"
    online = read_metrics(tmp_path, "distill")
    cached = read_metrics(distill_run, "distill")
    # Same initial weights, same batches: 1 worker recomputing the teacher, stopped after
    # step 2 and resumed (weights, Adam state, data position), must follow 2 workers
    # reading the cache step for step, up to float summation order.
    assert [r["step"] for r in online] == list(range(1, 19))
    for a, b in zip(online, cached):
        assert a["tokens"] == b["tokens"] and a["seen_digest"] == b["seen_digest"]
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-3)


def test_sft_lowers_held_out_loss(ray_cluster, tiny_model, tmp_path):
    assert main(["sft", "--config", TINY, "--run-dir", str(tmp_path), "data.num_synthetic=400",
                 "tracking.wandb=disabled"]) == 0
    ev = json.loads((tmp_path / "sft_eval.json").read_text())
    # 22 steps at lr 1e-3 on a random model: the response tokens' loss falls by well over a nat
    assert ev["heldout_loss_after"] < ev["heldout_loss_before"] - 1.0
    assert ev["held_out_sequences"] == 40 and ev["steps"] == 360 // 16 + 1
    assert (tmp_path / "policy" / "model.safetensors").exists()
