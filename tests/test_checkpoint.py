"""The one checkpoint format and the learners' training kit, without Ray or a process group.

Files round-trip exactly (weights, name-keyed Adam state, betas as a tuple);
`latest_checkpoint` returns only complete saves; overwriting a step survives a
crash at each point of the swap; the manifest catches a file cut, lost or
changed on disk, and `resume_checkpoint` passes over such a checkpoint to the
one before; leftovers of killed saves are cleaned (or recovered); pruning keeps
the newest K; save/restore through torch's distributed state-dict API works on
a plain module in a world of one.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from hh_ray.checkpoint import (CHECKPOINT_PREFIX, CheckpointError, checkpoint_dir, clean_leftovers,
                               latest_checkpoint, model_file, prune_checkpoints, read_checkpoint, read_state,
                               resume_checkpoint, verify_checkpoint, write_checkpoint)
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
        "manifest.json", "policy.optimizer.json", "policy.optimizer.safetensors", "policy.safetensors",
        "state.json"]  # no pickles
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["policy.optimizer.json", "policy.optimizer.safetensors", "policy.safetensors",
                                "state.json"]  # every file but itself, state.json's bytes included
    assert all(manifest[n]["size"] == (folder / n).stat().st_size and len(manifest[n]["sha256"]) == 64
               for n in manifest)
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


# ---------------------------------------------------------------- manifest, resume, leftovers, pruning

def flip_byte(path, at: int = -1) -> None:
    """Damage a file in place without changing its size (what bit rot or a bad copy does)."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,msg", [
    (lambda f: flip_byte(f / "model.safetensors"), "model.safetensors differs from manifest.json"),
    (lambda f: flip_byte(f / "state.json", 1), "state.json differs from manifest.json"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-3]),
     "model.safetensors is .* bytes, manifest.json says"),
    (lambda f: (f / "model.optimizer.json").unlink(), "model.optimizer.json is missing"),
    (lambda f: (f / "manifest.json").unlink(), "no manifest.json"),
    (lambda f: (f / "manifest.json").write_text('{"files": {'), "manifest.json is damaged"),
    (lambda f: (f / "state.json").unlink(), "incomplete, no state.json"),
])
def test_a_damaged_checkpoint_is_refused_on_load_naming_the_file(tmp_path, damage, msg):
    m, opt = net()
    train(m, opt, 1)
    folder = write_checkpoint(checkpoint_dir(tmp_path, 1), {"model": m.state_dict()}, {"model": name_keyed(m, opt)},
                              {"global_step": 1})
    assert sorted(verify_checkpoint(folder)) == ["model.optimizer.json", "model.optimizer.safetensors",
                                                 "model.safetensors", "state.json"]
    damage(folder)
    with pytest.raises(CheckpointError, match=msg) as e:
        read_checkpoint(folder)
    assert str(folder) in str(e.value)
    b, opt_b = net(seed=1)
    with pytest.raises(CheckpointError, match=msg):
        restore_checkpoint(folder, {"model": b}, {"model": opt_b})
    assert isinstance(e.value, ValueError)  # the CLI reports it as a one-line error, exit 2


def test_reading_one_model_checks_only_its_file(tmp_path):
    folder = write_checkpoint(checkpoint_dir(tmp_path, 1), {"policy": {"w": torch.ones(2)}, "critic": {"v": torch.ones(3)}},
                              {}, {"iteration": 1})
    flip_byte(folder / "critic.safetensors")
    assert load_file(str(model_file(folder, "policy")))["w"].tolist() == [1.0, 1.0]
    with pytest.raises(CheckpointError, match="critic.safetensors differs"):
        model_file(folder, "critic")
    with pytest.raises(CheckpointError, match="value.safetensors is not in its manifest.json"):
        model_file(folder, "value")


def test_resume_skips_a_corrupt_or_incomplete_newest_checkpoint_and_says_so(tmp_path):
    said = []
    assert resume_checkpoint(tmp_path / "missing", said.append) is None and said == []
    for step in (2, 4, 6, 8):
        small_checkpoint(checkpoint_dir(tmp_path, step), step, value=float(step))
    assert resume_checkpoint(tmp_path, said.append) == checkpoint_dir(tmp_path, 8) and said == []
    flip_byte(checkpoint_dir(tmp_path, 8) / "model.safetensors")  # the newest: damaged
    (checkpoint_dir(tmp_path, 6) / "state.json").unlink()         # the one before: a cut-short deletion
    (tmp_path / "step-000010.tmp-1").mkdir()                      # a save in progress: not a candidate
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 8)  # cheap: looks complete
    got = resume_checkpoint(tmp_path, said.append)
    assert got == checkpoint_dir(tmp_path, 4) and read_checkpoint(got)[0]["model"]["w"][0] == 4.0
    assert len(said) == 3
    assert "step-000008" in said[0] and "model.safetensors differs" in said[0]
    assert "step-000006" in said[1] and "incomplete" in said[1]
    assert "resuming from" in said[2] and "skipped step-000008, step-000006" in said[2]
    for step in (2, 4):
        flip_byte(checkpoint_dir(tmp_path, step) / "state.json", 1)
    assert resume_checkpoint(tmp_path, said.append) is None


def test_clean_leftovers_removes_killed_saves_and_recovers_a_cut_swap(tmp_path):
    said = []
    assert clean_leftovers(tmp_path / "missing", log=said.append) == [] and said == []
    small_checkpoint(checkpoint_dir(tmp_path, 1), 1, value=1.0)
    shutil.copytree(checkpoint_dir(tmp_path, 1), tmp_path / "step-000001.old-77")  # aside copy of a done swap
    (tmp_path / "step-000002.tmp-77").mkdir()                                  # a save killed half-way
    (tmp_path / "step-000002.tmp-77" / "model.safetensors").write_bytes(b"half")
    # an overwrite of step 3 killed between its renames: only the aside (old) and the new (tmp) copy
    small_checkpoint(tmp_path / "step-000003.old-78", 3, value=30.0)
    small_checkpoint(tmp_path / "step-000003.tmp-78", 3, value=31.0)
    (tmp_path / "attempt-20240101").mkdir()  # Ray Train's run files: not ours to touch
    removed = clean_leftovers(tmp_path, log=said.append)
    assert sorted(p.name for p in removed) == ["step-000001.old-77", "step-000002.tmp-77", "step-000003.old-78"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attempt-20240101", "step-000001", "step-000003"]
    assert read_checkpoint(checkpoint_dir(tmp_path, 3))[0]["model"]["w"][0] == 31.0  # the newer save
    assert any("recovered" in s for s in said) and any("removed 3 leftover" in s for s in said)
    # without recovery (a fresh run) both copies simply go
    small_checkpoint(tmp_path / "step-000004.tmp-79", 4)
    clean_leftovers(tmp_path, recover=False, log=said.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attempt-20240101", "step-000001", "step-000003"]
    # a damaged new copy is not recovered: the old one is
    small_checkpoint(tmp_path / "step-000005.old-80", 5, value=50.0)
    small_checkpoint(tmp_path / "step-000005.tmp-80", 5, value=51.0)
    flip_byte(tmp_path / "step-000005.tmp-80" / "model.safetensors")
    clean_leftovers(tmp_path, log=said.append)
    assert read_checkpoint(checkpoint_dir(tmp_path, 5))[0]["model"]["w"][0] == 50.0
    assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob("*.old-*"))


def test_prune_keeps_k_and_the_protected_one_and_clears_old_incomplete_folders(tmp_path):
    for step in range(1, 7):
        small_checkpoint(checkpoint_dir(tmp_path, step), step)
    (checkpoint_dir(tmp_path, 2) / "state.json").unlink()  # a deletion cut short: incomplete
    prune_checkpoints(tmp_path, keep=0)  # 0: keep all
    assert len(list(tmp_path.iterdir())) == 6
    prune_checkpoints(tmp_path, keep=3, protect=checkpoint_dir(tmp_path, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000004", "step-000005", "step-000006"]
    small_checkpoint(checkpoint_dir(tmp_path, 7), 7)
    prune_checkpoints(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000005", "step-000006", "step-000007"]


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
