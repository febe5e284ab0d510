"""Broadcast weight sync (`generation.weight_sync: broadcast`): the bucket codec by hand, a
gloo group in one process, and real vLLM engines receiving through vLLM's weight-transfer
API on a real local Ray cluster; a revived generator rejoins a group formed anew."""

import dataclasses
import threading

import pytest
import ray
import torch

from hh_ray.weights import (ALIGN, join_group, pack_bucket, plan_buckets, receive_weights, rendezvous, send_weights,
                            tensor_specs, unpack_bucket)


def test_plan_buckets_by_hand():
    # float32 [3] = 12 B -> 16 padded; [8] = 32; [100] = 400; float16 [4] = 8 -> 16
    specs = [["a", "float32", [3]], ["b", "float32", [8]], ["c", "float32", [100]], ["d", "float16", [4]]]
    assert plan_buckets(specs, 48) == [[0, 1], [2], [3]]   # 16+32=48 fits; c alone exceeds; d after
    assert plan_buckets(specs, 10_000) == [[0, 1, 2, 3]]
    assert plan_buckets(specs, 1) == [[0], [1], [2], [3]]


def test_pack_unpack_round_trip_mixed_dtypes_and_aliases():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(5, 3, generator=g)
    state = {"emb": emb, "half": torch.randn(7, generator=g).half(), "bf": torch.randn(2, 3, generator=g).bfloat16(),
             "t": torch.randn(4, 2, generator=g).t(),  # not contiguous
             "lm_head": emb}  # tied: the same storage
    specs, aliases = tensor_specs(state)
    assert [s[0] for s in specs] == ["emb", "half", "bf", "t"] and aliases == {"lm_head": "emb"}
    assert specs[3] == ["t", "float32", [2, 4]]
    buf = pack_bucket([state[s[0]] for s in specs])
    assert buf.dtype == torch.uint8 and buf.numel() == 64 + 16 + 16 + 32  # the last tensor is not padded
    back = dict(unpack_bucket(buf, specs))
    for name in ("emb", "half", "bf", "t"):
        assert back[name].dtype == state[name].dtype and torch.equal(back[name], state[name]), name


def test_gloo_broadcast_in_buckets_between_two_ranks():
    """Rank 0 sends, rank 1 receives, each with its own store client, as two processes would."""
    state = {f"w{i}": torch.full((i + 1, 3), float(i)) for i in range(6)}
    state["alias"] = state["w2"]
    specs, aliases = tensor_specs(state)
    host = rendezvous("127.0.0.1", 0, 2, True, 30)
    got = {}

    def receiver():
        store = rendezvous("127.0.0.1", host.port, 2, False, 30)
        group = join_group(store, 1, 2, "gloo", 30)
        got.update(receive_weights(group, specs, aliases, bucket_bytes=64))

    t = threading.Thread(target=receiver)
    t.start()
    group = join_group(host, 0, 2, "gloo", 30)
    sent = send_weights(group, state, specs, bucket_bytes=64)
    t.join(30)
    assert sorted(got) == sorted(state)
    assert all(torch.equal(got[k], v) for k, v in state.items())
    # 12, 24, ..., 72 bytes; 64-byte buckets [w0 w1] [w2] [w3] [w4] [w5]: only w0 is padded (12 -> 16)
    assert sent == (12 + 24 + 36 + 48 + 60 + 72) + 4
    # a bucket of one contiguous tensor travels as that tensor's own bytes
    big = torch.arange(6.0)
    assert pack_bucket([big]).data_ptr() == big.data_ptr()


# ---------------------------------------------------------------- real engines

@pytest.fixture(scope="module")
def broadcast_pool(ray_cluster, tiny_model):
    from actors.generation import GenerationPool
    from hh_ray.config import GenerationConfig

    cfg = GenerationConfig(num_workers=2, cpus_per_worker=1, max_new_tokens=8, kv_cache_gib=0.25,
                           weight_sync="broadcast")
    pool = GenerationPool(tiny_model, cfg, 128, seed=0)
    yield pool
    pool.shutdown()


def _perturbed(tiny_model, seed):
    from hh_ray.models import load_policy

    policy = load_policy(tiny_model)
    torch.manual_seed(seed)
    return type(policy)(policy.config).eval()


def _max_logprob_error(pool, model, ids, version):
    from hh_ray.ppo import policy_logprobs

    batch = pool.generate(ids, temperature=1.0, seed=3, expected_version=version)
    with torch.no_grad():
        hf = policy_logprobs(model, batch.input_ids, batch.attention_mask)
    return float((batch.behaviour_logprobs - hf)[batch.response_mask.bool()].abs().max())


def test_broadcast_reaches_every_engine_and_a_revived_one_rejoins(broadcast_pool, tiny_model):
    from learners.weight_sync import WeightBroadcaster

    pool = broadcast_pool
    ids = [[1, 5, 9, 13], [2, 7, 11], [3, 4, 5, 6, 7]]
    sender = WeightBroadcaster(torch.device("cpu"), bucket_bytes=256 << 10)  # several buckets for the tiny model
    new = _perturbed(tiny_model, 1)
    out = sender.send(new.state_dict(), 1, pool.workers)
    assert out["versions"] == [1, 1] and pool.versions() == [1, 1] and out["time_connect"] > 0
    assert _max_logprob_error(pool, new, ids, 1) < 1e-3  # the engines hold the new weights

    newer = _perturbed(tiny_model, 2)
    out = sender.send(newer.state_dict(), 2, pool.workers)
    assert out["time_connect"] == 0  # the same members: the group is reused
    assert _max_logprob_error(pool, newer, ids, 2) < 1e-3

    # A generator dies: the pool revives it from the object store, and the next broadcast forms
    # a new group with it (its members changed).
    from hh_ray.weights import weights_for_sync

    ray.kill(pool.workers[1])
    assert pool.revive(2, ray.put(weights_for_sync(newer))) == 1
    newest = _perturbed(tiny_model, 3)
    out = sender.send(newest.state_dict(), 3, pool.workers)
    assert out["time_connect"] > 0 and pool.versions() == [3, 3]
    assert _max_logprob_error(pool, newest, ids, 3) < 1e-3


def test_a_broadcast_cut_off_half_way_holds_generation_until_a_complete_one(broadcast_pool, tiny_model):
    """The sender stops after the first bucket (as when a member dies mid-broadcast): every engine
    is left half-loaded and reports version -1, and `generate` refuses. An engine step that fails
    anyway leaves no request in the engine (one left there hung the next `generate` for good),
    and the next complete broadcast brings the engines back."""
    import gc

    from actors.generation import IncompleteWeightsError
    from hh_ray.weights import _start_broadcast
    from learners.weight_sync import WeightBroadcaster

    pool = broadcast_pool
    ids = [[1, 5, 9, 13], [2, 7, 11], [3, 4, 5, 6, 7]]
    sender = WeightBroadcaster(torch.device("cpu"), bucket_bytes=256 << 10)
    new = _perturbed(tiny_model, 4)
    state = new.state_dict()
    specs, aliases = tensor_specs(state)
    sender.connect(pool.workers)
    update = {"specs": specs, "aliases": aliases, "bucket_bytes": sender.bucket_bytes}
    receiving = [w.receive_weights.remote(10, update) for w in pool.workers]
    first = plan_buckets(specs, sender.bucket_bytes)[0]
    _start_broadcast(sender.group, pack_bucket([state[specs[i][0]] for i in first])).wait()
    sender.close()
    gc.collect()  # the group's sockets close: the receivers' next bucket fails
    for ref in receiving:
        with pytest.raises(ray.exceptions.RayTaskError, match="by peer"):  # closed, or reset
            ray.get(ref, timeout=120)
    assert pool.versions() == [-1, -1]
    with pytest.raises(IncompleteWeightsError, match="cut off half-way"):
        pool.generate(ids, seed=3)

    worker = pool.workers[0]
    ray.get(worker.__ray_call__.remote(lambda w: setattr(w, "_version", 9)))  # past the refusal
    with pytest.raises(ray.exceptions.RayTaskError):  # the unloaded layers fail the forward pass
        ray.get(worker.generate.remote(ids, seed=3), timeout=120)
    unfinished = lambda w: w.llm.llm_engine.get_num_unfinished_requests()  # noqa: E731
    assert ray.get(worker.__ray_call__.remote(unfinished)) == 0

    out = sender.send(state, 11, pool.workers)
    assert out["versions"] == [11, 11]
    done = [w.generate.remote(ids, seed=3, expected_version=11) for w in pool.workers]
    assert all(len(b) == len(ids) for b in ray.get(done, timeout=120))  # a left request: no answer
    assert _max_logprob_error(pool, new, ids, 11) < 1e-3


def test_a_broadcast_command_leaves_the_channel_actor_without_torch(broadcast_pool):
    """The learners' commands travel through the channel actor (a Ray worker with nothing but
    Ray loaded); the broadcast command's generation-worker handles must not make that process
    import the generation module and torch with it (0.19 GiB for the rest of a run)."""
    from actors.rollout_queue import RolloutQueue
    from learners.ppo_learner import command_channels
    from learners.transport import Command

    queue = RolloutQueue(1)
    try:
        [channel] = command_channels(queue, 1)
        channel.put(Command(1, "run", "broadcast", {"version": 1, "workers": broadcast_pool.workers}))
        loaded = ray.get(queue._actor.__ray_call__.remote(lambda actor: sorted(
            m for m in ("torch", "actors.generation") if m in __import__("sys").modules)))
        assert loaded == []
        assert channel.get(timeout=30).args == {"version": 1, "workers": broadcast_pool.workers}
    finally:
        queue.shutdown()
