"""The rollout side on a real local Ray cluster with real vLLM engines on the tiny model.

vLLM engines cost ~15 s each to start, so the pool and PM service are started
once for the module and shared; the test that changes the
weights runs last.
"""

import queue as stdlib_queue

import pytest
import ray
import torch

from actors.generation import GenerationInputError, GenerationPool, StaleWeightsError, WeightUpdateError
from actors.pm_service import start_pm_scorer
from actors.rollout_queue import RolloutQueue, RolloutQueueTimeout
from hh_ray.config import GenerationConfig
from hh_ray.data import prompts_of, synthetic_comparisons
from hh_ray.models import encode_for_pm, load_policy, load_scalar_head_model, load_tokenizer, pm_scores, save_model
from hh_ray.ppo import policy_logprobs
from hh_ray.rollout import RolloutBatch

MAX_LEN = 128
MAX_NEW = 16


@pytest.fixture(scope="module")
def gen_cfg():
    return GenerationConfig(num_workers=2, cpus_per_worker=1, max_new_tokens=MAX_NEW, kv_cache_gib=0.25)


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_model, gen_cfg):
    p = GenerationPool(tiny_model, gen_cfg, MAX_LEN, seed=0)
    yield p
    p.shutdown()


@pytest.fixture(scope="module")
def pm_dir(tiny_model, tmp_path_factory):
    """A PM built on the tiny policy (random head), saved as a PM folder."""
    model, tok = load_scalar_head_model(tiny_model)
    return str(save_model(model, tok, tmp_path_factory.mktemp("pm") / "pm"))


@pytest.fixture(scope="module")
def pm(ray_cluster, pm_dir):
    return start_pm_scorer(pm_dir, max_len=256)


@pytest.fixture(scope="module")
def prompts(tiny_model):
    tok = load_tokenizer(tiny_model)
    texts = prompts_of(synthetic_comparisons(10, seed=3))
    ids = [tok(t, add_special_tokens=False)["input_ids"][-(MAX_LEN - MAX_NEW):] for t in texts]
    return texts, ids


def greedy(pool, ids, **kw):
    return pool.generate(ids, temperature=0.0, max_new_tokens=8, **kw)


def response_ids(batch: RolloutBatch) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(batch.input_ids, batch.response_mask)]


def test_pm_service_resolves_auto_autocast_on_its_own_device(ray_cluster, pm_dir):
    from hh_ray.runtime import resolve_autocast

    auto = start_pm_scorer(pm_dir, max_len=256, autocast="auto")
    try:
        where = ray.get(auto.placement.remote(), timeout=120)
        # on this machine's CPU, as this process would choose; and it says why
        assert (where["autocast"], where["autocast_why"]) == resolve_autocast("auto")
        assert where["device"] == "cpu" and "matmul" in where["autocast_why"]
        # under bf16 the service keeps its matmul weights in bf16: the same scores, half the memory
        assert where["linear_weights"] == ("bfloat16" if where["autocast"] == "bfloat16" else "float32")
    finally:
        ray.kill(auto)


def test_rollouts_scored_and_queued(pool, pm, pm_dir, prompts):
    texts, ids = prompts
    batch = pool.generate(ids, texts, temperature=1.0, seed=7)
    assert len(batch) == len(ids)
    assert batch.prompts == texts  # input order survives the spread over 2 workers
    for i, p in enumerate(ids):
        assert batch.input_ids[i, : len(p)].tolist() == p
    assert batch.policy_version.tolist() == [0] * len(ids)
    assert set(batch.finish_reasons) <= {"stop", "length"}
    assert (batch.response_lengths >= 1).all() and (batch.response_lengths <= MAX_NEW).all()
    lp = batch.behaviour_logprobs
    assert (lp[batch.response_mask.bool()] < 0).all() and (lp[~batch.response_mask.bool()] == 0).all()
    # Per-prompt seeds: the same call gives the same samples, whatever the split.
    assert response_ids(pool.generate(ids, texts, temperature=1.0, seed=7)) == response_ids(batch)

    # generation -> PM -> queue, the batch as one ObjectRef
    queue = RolloutQueue(maxsize=2)
    batch.pm_score = torch.tensor(ray.get(pm.score.remote(batch.prompts, batch.responses)))
    queue.put(ray.put(batch), timeout=60)
    got = ray.get(queue.get(timeout=60))
    assert got.pm_score.shape == (len(ids),) and torch.isfinite(got.pm_score).all()

    # The service's scores are the HF PM's on the re-tokenised text.
    model, tok = load_scalar_head_model(pm_dir)
    enc = encode_for_pm(tok, [p + r for p, r in zip(got.prompts, got.responses)], 256)
    with torch.no_grad():
        expected = pm_scores(model.eval(), enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(got.pm_score, expected, atol=1e-4, rtol=1e-4)

    # Concurrent callers are batched together and each gets its own scores back.
    parts = [pm.score.remote(got.prompts[i: i + 2], got.responses[i: i + 2]) for i in range(0, len(ids), 2)]
    torch.testing.assert_close(torch.tensor(sum(ray.get(parts), [])), expected, atol=1e-4, rtol=1e-4)


def test_behaviour_logprobs_match_hf(pool, tiny_model, prompts):
    """vLLM's behaviour log-probs vs an HF fp32 forward over the same tokens."""
    texts, ids = prompts
    batch = pool.generate(ids, texts, temperature=1.0, seed=1)
    mask = batch.response_mask.bool()
    with torch.no_grad():
        hf = policy_logprobs(load_policy(tiny_model).eval(), batch.input_ids, batch.attention_mask)
    diff = (batch.behaviour_logprobs - hf)[mask].abs()
    print(f"\nbehaviour vs HF log-probs, T=1.0: mean |diff| {diff.mean():.2e}, max {diff.max():.2e} "
          f"over {int(mask.sum())} tokens")
    # ~5e-6 per token was measured on SmolLM2; fp32 kernels differ in summation
    # order, so allow an order of magnitude more on the mean.
    assert diff.mean() < 1e-4 and diff.max() < 1e-3

    # processed_logprobs: at T != 1 they are the tempered distribution's.
    batch = pool.generate(ids, texts, temperature=0.7, seed=2)
    mask = batch.response_mask.bool()
    with torch.no_grad():
        hf = policy_logprobs(load_policy(tiny_model).eval(), batch.input_ids, batch.attention_mask, 0.7)
    diff = (batch.behaviour_logprobs - hf)[mask].abs()
    print(f"behaviour vs HF log-probs, T=0.7: mean |diff| {diff.mean():.2e}, max {diff.max():.2e}")
    assert diff.mean() < 1e-4 and diff.max() < 1e-3


def test_bad_prompts_are_refused_and_engine_keeps_serving(pool, prompts):
    _, ids = prompts
    before = response_ids(greedy(pool, ids[:3]))
    with pytest.raises(GenerationInputError, match="max length is 128"):
        pool.generate([ids[0], [5] * MAX_LEN])
    # A prompt that fits but leaves less room than max_new_tokens stops at the max length.
    tail = pool.generate([[5] * (MAX_LEN - 4)], temperature=1.0, max_new_tokens=MAX_NEW)
    assert int(tail.attention_mask.sum()) <= MAX_LEN and tail.finish_reasons[0] in ("length", "stop")
    with pytest.raises(GenerationInputError, match="prompt 1 is empty"):
        pool.generate([ids[0], []])
    # The workers check on their own too (a caller may bypass the pool).
    with pytest.raises(GenerationInputError, match="outside the vocabulary"):
        ray.get(pool.workers[1].generate.remote([[10**6]]))
    assert response_ids(greedy(pool, ids[:3])) == before


def test_bad_weights_are_refused_and_old_weights_serve(pool, tiny_model, prompts):
    _, ids = prompts
    before = response_ids(greedy(pool, ids[:3]))
    sd = load_policy(tiny_model).state_dict()
    missing = {k: v for k, v in sd.items() if k != "model.norm.weight"}
    with pytest.raises(WeightUpdateError, match="missing 1 tensor.*model.norm.weight"):
        pool.update_weights(1, ray.put(missing))
    name = "model.layers.0.mlp.up_proj.weight"
    misshaped = {**sd, name: sd[name][:-1]}
    with pytest.raises(WeightUpdateError, match=f"{name}: shape"):
        pool.update_weights(1, ray.put(misshaped))
    assert pool.versions() == [0, 0]
    assert response_ids(greedy(pool, ids[:3])) == before


def test_weight_update_changes_outputs_and_version(pool, tiny_model, prompts):
    texts, ids = prompts
    before = greedy(pool, ids)
    # "Perturbed weights": the same architecture, re-initialised with another seed.
    policy = load_policy(tiny_model)
    torch.manual_seed(1)
    new = type(policy)(policy.config).eval()
    seconds = pool.update_weights(1, ray.put(new.state_dict()))
    print(f"\nweight sync to 2 workers: {seconds * 1000:.0f} ms")
    assert pool.versions() == [1, 1]
    after = greedy(pool, ids)
    assert response_ids(after) != response_ids(before)
    assert after.policy_version.tolist() == [1] * len(ids)

    # The engine really holds the new weights: its log-probs are the new model's.
    batch = pool.generate(ids, texts, temperature=1.0, seed=3, expected_version=1)
    assert batch.policy_version.tolist() == [1] * len(ids)
    with torch.no_grad():
        hf = policy_logprobs(new, batch.input_ids, batch.attention_mask)
    mask = batch.response_mask.bool()
    assert (batch.behaviour_logprobs - hf)[mask].abs().max() < 1e-3

    # Sync mode: a worker asked for a version it does not hold refuses.
    with pytest.raises(StaleWeightsError, match="holds policy version 1, expected 2"):
        pool.generate(ids, expected_version=2)


def test_rollout_queue_backpressure_and_timeouts(ray_cluster):
    queue = RolloutQueue(maxsize=1)
    queue.put(ray.put("batch-0"))
    with pytest.raises(RolloutQueueTimeout, match="full"):
        queue.put(ray.put("batch-1"), timeout=0.5)  # back-pressure
    pending = queue.put_async(ray.put("batch-2"))
    assert ray.get(queue.get(timeout=5)) == "batch-0"
    assert ray.get(pending) is None  # space freed, the blocked put went through
    assert ray.get(queue.get(timeout=5)) == "batch-2"
    with pytest.raises(RolloutQueueTimeout, match="no rollout batch within"):
        queue.get(timeout=0.5)
    with pytest.raises(TypeError, match="ObjectRefs"):
        queue.put("not a ref")

    # The same actor carries message channels (the learners' commands and results):
    # separate from the rollouts and from each other, in order, nested refs kept as refs.
    commands, results = queue.channel("learner-0-commands"), queue.channel("learner-results")
    assert commands.empty() and results.empty()
    weights = ray.put({"w": 1})
    commands.put({"cmd": "train", "batch": [weights]})
    commands.put({"cmd": "stop"})
    assert queue.qsize() == 0 and results.empty() and not commands.empty()
    first = commands.get(timeout=5)
    assert first["cmd"] == "train" and ray.get(first["batch"][0]) == {"w": 1}
    assert commands.get(timeout=5) == {"cmd": "stop"}
    with pytest.raises(stdlib_queue.Empty, match="learner-results"):
        results.get(timeout=0.2)
    queue.shutdown()


def test_cpu_engine_settings():
    from actors.vllm_engine import EngineError, engine_kwargs, on_gpu

    if on_gpu():
        pytest.skip("this machine has a GPU")
    with pytest.raises(EngineError, match="tensor_parallel_size"):
        engine_kwargs("m", GenerationConfig(tensor_parallel_size=2), 128)
    kw = engine_kwargs("m", GenerationConfig(kv_cache_gib=0.5), 128)
    assert kw["kv_cache_memory_bytes"] == 2**29 and kw["enforce_eager"] and kw["dtype"] == "float32"
    assert kw["logprobs_mode"] == "processed_logprobs"


def test_cpu_engines_rank_sampled_tokens_eagerly(pool):
    """vLLM's rank of a sampled token among the logprobs, compiled by torch inductor on first use
    (a C++ build in every engine's first generate on CPU), is counted eagerly instead."""
    from actors.vllm_engine import count_at_least, on_gpu

    if on_gpu():
        pytest.skip("this machine has a GPU: vLLM's compiled kernel is kept")
    x = torch.tensor([[0.1, 0.5, 0.3, 0.3], [-1.0, -2.0, -3.0, -0.5]])
    assert count_at_least(x, torch.tensor([[0.3], [-1.0]])).tolist() == [3, 2]
    held = lambda w: __import__("vllm.v1.sample.sampler", fromlist=["_"]).batched_count_greater_than  # noqa: E731
    assert ray.get(pool.workers[0].__ray_call__.remote(held)) is count_at_least


def test_weights_for_sync_are_zero_copy_arrays(ray_cluster, tiny_model):
    """Published weights are numpy arrays (one memcpy into the object store, none out of it),
    a tied alias is one array (stored once), and they come back as the same tensors."""
    import numpy as np

    from hh_ray.weights import as_tensors, weights_for_sync

    model = load_policy(tiny_model)
    model.lm_head.weight = model.model.embed_tokens.weight
    w = weights_for_sync(model)
    assert all(isinstance(v, np.ndarray) for v in w.values())
    assert w["lm_head.weight"] is w["model.embed_tokens.weight"]
    back = as_tensors(ray.get(ray.put(w)))
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k
    bf16 = weights_for_sync(model.to(torch.bfloat16))  # no numpy bfloat16: stays a tensor
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 for v in bf16.values())


def test_tied_output_layer_is_synced(ray_cluster, tiny_model, gen_cfg, prompts, tmp_path):
    """A tied lm_head (SmolLM2 has one) reaches the engine: vLLM's layer-wise reload
    keeps a stale tied output layer if only the embedding is sent, as a model folder's
    file has it; the worker then sends the alias itself."""
    import dataclasses

    from hh_ray.weights import weights_for_sync

    model = load_policy(tiny_model).eval()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    path = save_model(model, load_tokenizer(tiny_model), tmp_path / "tied")
    pool = GenerationPool(str(path), dataclasses.replace(gen_cfg, num_workers=1), MAX_LEN)
    try:
        texts, ids = prompts
        for version, drop in ((1, set()), (2, {"lm_head.weight"})):
            with torch.no_grad():
                model.model.embed_tokens.weight.mul_(3.0)  # the output layer with it
            weights = {k: v for k, v in weights_for_sync(model).items() if k not in drop}
            pool.update_weights(version, ray.put(weights))
            batch = pool.generate(ids, texts, temperature=1.0, seed=4)
            with torch.no_grad():
                hf = policy_logprobs(model, batch.input_ids, batch.attention_mask)
            assert (batch.behaviour_logprobs - hf)[batch.response_mask.bool()].abs().max() < 1e-3
    finally:
        pool.shutdown()


def test_a_response_stopped_at_the_turn_boundary_is_the_prefix_of_the_unstopped_one(pool, prompts):
    """With the same seed, a stop string cuts the response where it begins: text and token ids
    are prefixes of the unstopped sample's, and the stop string's tokens are not kept."""
    texts, ids = prompts
    free = pool.generate(ids, texts, temperature=1.0, max_new_tokens=MAX_NEW, seed=11)
    # a stop string each response really produces: a piece of its own text
    i = next(k for k, r in enumerate(free.responses) if len(r) > 8)
    stop = free.responses[i][len(free.responses[i]) // 2:][:3]
    cut = pool.generate(ids, texts, temperature=1.0, max_new_tokens=MAX_NEW, seed=11, stop=[stop])
    assert cut.finish_reasons[i] == "stop" and stop not in cut.responses[i]
    for k in range(len(ids)):
        assert free.responses[k].startswith(cut.responses[k])
        full, part = response_ids(free)[k], response_ids(cut)[k]
        assert full[: len(part)] == part
        assert torch.allclose(cut.behaviour_logprobs[k][cut.response_mask[k].bool()],
                              free.behaviour_logprobs[k][free.response_mask[k].bool()][: len(part)], atol=1e-5)
    assert len(response_ids(cut)[i]) < len(response_ids(free)[i])
    assert cut.ended[i] and not bool((~cut.ended).all())


def test_chat_format_ends_the_turn_at_its_end_of_turn_token(ray_cluster, tiny_chat_model, gen_cfg):
    """The chat template's end-of-turn token stops generation and stays in the trained response;
    the response text holds no control token."""
    import dataclasses

    from hh_ray.conversation import end_of_turn_token_ids, prompt_token_ids

    tok = load_tokenizer(tiny_chat_model)
    end = end_of_turn_token_ids(tok, "chat")
    hh = prompts_of(synthetic_comparisons(12, seed=5))
    ids = prompt_token_ids(hh, tok, "chat")
    chat_pool = GenerationPool(tiny_chat_model, dataclasses.replace(gen_cfg, num_workers=1, max_new_tokens=48),
                               MAX_LEN, conversation_format="chat")
    try:
        batch = chat_pool.generate(ids, hh, temperature=1.0, seed=3)
    finally:
        chat_pool.shutdown()
    for k, r in enumerate(response_ids(batch)):
        ended = batch.finish_reasons[k] == "stop"
        assert ended == (r[-1] in end)  # ended by the end-of-turn token, which is kept
        assert not any(t in end for t in r[:-1])
        assert "<|im_end|>" not in batch.responses[k]
    assert batch.ended.any()  # a random tiny model still ends some turns within 48 tokens
