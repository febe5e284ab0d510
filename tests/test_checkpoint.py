"""The one checkpoint format and the learners' training kit, without Ray or a process group.

Files round-trip exactly (weights, name-keyed Adam state, betas as a tuple);
`latest_checkpoint` returns only complete saves; overwriting a step survives a
crash at each point of the swap; save/restore through torch's distributed
state-dict API works on a plain module in a world of one.
"""

import json
import os
import shutil

import pytest
import torch

from hh_ray.checkpoint import (CHECKPOINT_PREFIX, checkpoint_dir, latest_checkpoint, prune_checkpoints,
                               read_checkpoint, read_state, write_checkpoint)
from learners.kit import (adamw, all_reduce_mean, all_reduce_sum, clip_and_step, no_sync_unless,
                          restore_checkpoint, save_checkpoint, unwrap)


def net(seed: int = 0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    return m, torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.8, 0.95))


def train(m, opt, steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        m(torch.full((2, 3), float(i))).pow(2).sum().backward()
        clip_and_step(m, opt, max_norm=1.0)


def name_keyed(m, opt) -> dict:
    """The optimizer state as the learners save it: keyed by parameter name."""
    names = {id(p): n for n, p in m.named_parameters()}
    by_id = {id(p): p for p in m.parameters()}
    state = {names[id(p)]: s for p, s in opt.state.items() if id(p) in by_id}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in opt.param_groups]
    return {"state": state, "param_groups": groups}


class Killed(Exception):
    """Stands for the process dying at that point: nothing after it runs."""


def small_checkpoint(folder, step: int, value: float = 0.0):
    return write_checkpoint(folder, {"model": {"w": torch.full((2,), value)}}, {}, {"global_step": step})


# ---------------------------------------------------------------- files

def test_write_read_round_trip_keeps_names_and_betas(tmp_path):
    m, opt = net()
    train(m, opt, 3)
    folder = write_checkpoint(tmp_path / "step-000003", {"policy": m.state_dict()},
                              {"policy": name_keyed(m, opt)}, {"global_step": 3, "digest": "ab"})
    assert folder == tmp_path / "step-000003"
    assert sorted(p.name for p in folder.iterdir()) == [
        "policy.optimizer.json", "policy.optimizer.safetensors", "policy.safetensors", "state.json"]  # no pickles
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003"]  # no temporary left behind
    models, optimizers, state = read_checkpoint(folder)
    assert state == {"global_step": 3, "digest": "ab"}
    assert models["policy"].keys() == m.state_dict().keys()
    assert all(torch.equal(models["policy"][k], v) for k, v in m.state_dict().items())
    osd = optimizers["policy"]
    assert set(osd["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert osd["param_groups"][0]["betas"] == (0.8, 0.95) and osd["param_groups"][0]["params"] == [
        "0.weight", "0.bias", "1.weight", "1.bias"]
    for name, s in name_keyed(m, opt)["state"].items():
        assert torch.equal(osd["state"][name]["exp_avg"], s["exp_avg"])
        assert torch.equal(osd["state"][name]["step"], s["step"])


def test_checkpoint_dir_names_sort_like_steps(tmp_path):
    assert checkpoint_dir(tmp_path, 12) == tmp_path / f"{CHECKPOINT_PREFIX}000012" == tmp_path / "step-000012"


def test_latest_checkpoint_takes_the_highest_complete_step(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for step in (2, 10, 9):
        small_checkpoint(checkpoint_dir(tmp_path, step), step)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000010"
    # None of these is a complete, newer checkpoint:
    (tmp_path / "step-000020").mkdir()  # no state.json: an unfinished save
    torn = tmp_path / "step-000030"
    torn.mkdir()
    (torn / "state.json").write_text('{"global_step": 3')  # torn write
    shutil.copytree(tmp_path / "step-000010", tmp_path / "step-000040.tmp-123")  # a save in progress
    shutil.copytree(tmp_path / "step-000010", tmp_path / "step-000050.old-123")  # an aside copy
    for junk in ("step-", "step-x1", "step-٣", "iter-000060", "attempt-20240101"):
        (tmp_path / junk).mkdir()
        (tmp_path / junk / "state.json").write_text("{}")
    (tmp_path / "step-000070").write_text("a file")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000010"


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        small_checkpoint(checkpoint_dir(tmp_path, step), step)
    (tmp_path / "step-000005.tmp-9").mkdir()  # another writer's save in progress: not prune's business
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003", "step-000004", "step-000005.tmp-9"]
    assert read_state(latest_checkpoint(tmp_path)) == {"global_step": 4}
    prune_checkpoints(tmp_path, keep=5)
    assert len(list(tmp_path.iterdir())) == 3


def test_overwriting_a_step_replaces_it(tmp_path):
    folder = checkpoint_dir(tmp_path, 5)
    small_checkpoint(folder, 5, value=1.0)
    small_checkpoint(folder, 5, value=2.0)
    assert read_checkpoint(folder)[0]["model"]["w"].tolist() == [2.0, 2.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000005"]


@pytest.mark.parametrize("crash_at", ["first rename", "second rename", "rmtree aside"])
def test_a_crash_while_overwriting_leaves_a_complete_checkpoint(tmp_path, monkeypatch, crash_at):
    """Kill the swap at each point: the old or the new checkpoint is on disk, whole."""
    folder = checkpoint_dir(tmp_path, 5)
    small_checkpoint(folder, 5, value=1.0)
    calls = {"rename": 0}
    real_rename, real_rmtree = os.rename, shutil.rmtree

    def rename(src, dst):
        calls["rename"] += 1
        if crash_at == ("first rename" if calls["rename"] == 1 else "second rename"):
            raise Killed
        real_rename(src, dst)

    def rmtree(path, *a, **kw):
        if crash_at == "rmtree aside" and ".old-" in str(path) and os.path.exists(path):
            raise Killed
        real_rmtree(path, *a, **kw)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        small_checkpoint(folder, 5, value=2.0)
    monkeypatch.undo()
    complete = [p for p in tmp_path.iterdir() if (p / "state.json").exists()
                and json.loads((p / "state.json").read_text()) == {"global_step": 5}]
    # the old and the new one, each whole, under its final, aside or temporary name
    assert {read_checkpoint(p)[0]["model"]["w"][0].item() for p in complete} == {1.0, 2.0}
    if crash_at == "first rename":  # nothing moved yet: the old one is still in place
        assert latest_checkpoint(tmp_path) == folder and read_checkpoint(folder)[0]["model"]["w"][0] == 1.0
    if crash_at == "rmtree aside":  # the new one is in place; the aside copy is ignored
        assert latest_checkpoint(tmp_path) == folder and read_checkpoint(folder)[0]["model"]["w"][0] == 2.0
    small_checkpoint(folder, 5, value=3.0)  # the next save of the step clears what the crash left
    assert latest_checkpoint(tmp_path) == folder and read_checkpoint(folder)[0]["model"]["w"][0] == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000005"]


# ---------------------------------------------------------------- the kit, world of one

def test_save_and_restore_round_trip_for_a_plain_module(tmp_path):
    a, opt_a = net()
    train(a, opt_a, 3)
    folder = save_checkpoint(tmp_path, 3, {"policy": a}, {"policy": opt_a}, {"global_step": 3}, rank=0)
    assert folder == tmp_path / "step-000003" and latest_checkpoint(tmp_path) == folder
    assert save_checkpoint(tmp_path, 4, {"policy": a}, {"policy": opt_a}, {}, rank=1) is None  # rank 0 writes
    _, optimizers, _ = read_checkpoint(folder)
    assert set(optimizers["policy"]["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}  # names, not ids

    b, opt_b = net(seed=1)  # other weights, no optimizer state yet
    assert restore_checkpoint(folder, {"policy": b}, {"policy": opt_b}) == {"global_step": 3}
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    for p, q in zip(a.parameters(), b.parameters()):
        assert all(torch.equal(opt_a.state[p][k], opt_b.state[q][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert opt_b.param_groups[0]["betas"] == (0.8, 0.95)
    train(a, opt_a, 1, start=3)
    train(b, opt_b, 1, start=3)  # Adam moments and step count must match for this to be equal
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))

    c, _ = net(seed=2)
    restore_checkpoint(folder, {"policy": c})  # weights only
    with pytest.raises(ValueError, match="no model 'critic'"):
        restore_checkpoint(folder, {"critic": c})


def test_all_reduce_in_a_world_of_one_is_the_identity():
    assert all_reduce_sum([1.5, 2.0, 3]) == [1.5, 2.0, 3.0]
    assert all_reduce_sum([]) == []
    assert all_reduce_mean({"b": 2.0, "a": 0.25}) == {"a": 0.25, "b": 2.0}
    assert all_reduce_sum([0.1, 0.2])[0] == 0.1  # float64: no float32 rounding


def test_unwrap_no_sync_clip_and_adamw():
    m, _ = net()
    wrapper = torch.nn.Module()
    wrapper.module = m
    assert unwrap(wrapper) is m and unwrap(m) is m
    entered = []

    class Wrapped(torch.nn.Module):
        def no_sync(self):
            entered.append(True)
            return torch.no_grad()

    w = Wrapped()
    with no_sync_unless(w, sync=True):
        pass
    with no_sync_unless(m, sync=False):  # no no_sync: a plain module always syncs
        pass
    assert entered == []
    with no_sync_unless(w, sync=False):
        pass
    assert entered == [True]

    opt = adamw(m.parameters(), lr=0.1)
    assert opt.defaults["fused"]  # float32 on the CPU
    (m(torch.ones(1, 3)) * 1e6).sum().backward()
    before = [p.detach().clone() for p in m.parameters()]
    clip_and_step(m, opt, max_norm=1.0)
    assert all(p.grad is None for p in m.parameters())  # cleared for the next step
    assert any(not torch.equal(p, q) for p, q in zip(before, m.parameters()))
