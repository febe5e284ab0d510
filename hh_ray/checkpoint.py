"""The one checkpoint format of every learner: tensors in safetensors, the rest in JSON.

A checkpoint is a folder root/step-NNNNNN holding, for each named model,
<name>.safetensors (its full state dict), for each named optimizer
<name>.optimizer.safetensors + <name>.optimizer.json (its full state dict keyed
by parameter *name*, so it loads whatever the wrapping: DDP, FSDP or none), and
state.json (the learner's position), written last. No pickles.

Writes are atomic: the folder is built under a temporary name, synced, and
renamed into place, so a run killed at any moment keeps a complete checkpoint
and `latest_checkpoint` never returns half a save.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "step-"
# PPO's checkpoints, under a run folder. Apart from the supervised learners' (run/checkpoints):
# the demo trains its PM and runs PPO in one folder, and their step numbers would collide.
PPO_CHECKPOINTS = Path("checkpoints") / "ppo"
STATE_FILE = "state.json"
MODEL_SUFFIX = ".safetensors"
OPTIMIZER_TENSORS = ".optimizer.safetensors"
OPTIMIZER_META = ".optimizer.json"


def checkpoint_dir(root: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives; zero-padded so names sort like steps."""
    return Path(root) / f"{CHECKPOINT_PREFIX}{step:06d}"


# ---------------------------------------------------------------- optimizer state <-> files

def optimizer_to_files(optim_sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors as "<param name>/<key>", the JSON-able rest) of a full optimizer state dict keyed by names.

    Parameter names hold dots but never slashes, so the split back is unambiguous.
    """
    tensors, scalars = {}, {}
    for name, state in optim_sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}/{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars[f"{name}/{k}"] = v
    return tensors, {"param_groups": optim_sd["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The optimizer state dict `optimizer_to_files` took apart; JSON turned Adam's betas into a list."""
    state: dict[str, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------- writing, atomically

def _fsync(path: Path) -> None:
    """Flush a file or folder to disk: a rename is only as durable as what it points at."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(folder: Path, models: dict, optimizers: dict, state: dict) -> None:
    """Every file of a checkpoint into `folder`, state.json last, each synced."""
    written = []
    for name, sd in models.items():
        # Cloned: safetensors refuses tensors that share storage (tied embeddings).
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in sd.items()},
                  str(folder / f"{name}{MODEL_SUFFIX}"))
        written.append(folder / f"{name}{MODEL_SUFFIX}")
    for name, optim_sd in optimizers.items():
        tensors, meta = optimizer_to_files(optim_sd)
        save_file(tensors, str(folder / f"{name}{OPTIMIZER_TENSORS}"))
        (folder / f"{name}{OPTIMIZER_META}").write_text(json.dumps(meta))
        written += [folder / f"{name}{OPTIMIZER_TENSORS}", folder / f"{name}{OPTIMIZER_META}"]
    for path in written:
        _fsync(path)
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
    _fsync(folder / STATE_FILE)
    _fsync(folder)


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Rename the finished `tmp` to `folder`. An existing `folder` is renamed aside first
    and deleted only once the new one is in place: until then one complete copy exists."""
    aside = folder.with_name(f"{folder.name}.old-{os.getpid()}")
    if folder.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(folder, aside)
    os.rename(tmp, folder)
    _fsync(folder.parent)
    shutil.rmtree(aside, ignore_errors=True)


def write_checkpoint(folder: Path, models: dict[str, dict[str, torch.Tensor]], optimizers: dict[str, dict],
                     state: dict) -> Path:
    """Write one checkpoint folder atomically and return it.

    models: name -> full state dict; optimizers: name -> full optimizer state dict
    keyed by parameter name (as get_optimizer_state_dict gives it); state: JSON-able.
    """
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a previous save of this process that died half-way
    tmp.mkdir(parents=True)
    _write_files(tmp, models, optimizers, state)
    _move_into_place(tmp, folder)
    return folder


# ---------------------------------------------------------------- reading

def read_state(folder: Path) -> dict:
    """The learner position of a checkpoint alone (drivers read it for progress, no tensors)."""
    return json.loads((Path(folder) / STATE_FILE).read_text())


def read_model_state(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """One model's state dict from a checkpoint (e.g. a PPO checkpoint's policy, to sample it)."""
    return load_file(str(Path(folder) / f"{name}{MODEL_SUFFIX}"))


def read_checkpoint(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict], dict]:
    """(models, optimizers, state) of a checkpoint folder, keyed as write_checkpoint was given them."""
    folder = Path(folder)
    models, optimizers = {}, {}
    for path in sorted(folder.iterdir()):
        if path.name.endswith(OPTIMIZER_META):
            name = path.name[: -len(OPTIMIZER_META)]
            optimizers[name] = optimizer_from_files(load_file(str(folder / f"{name}{OPTIMIZER_TENSORS}")),
                                                    json.loads(path.read_text()))
        elif path.name.endswith(MODEL_SUFFIX) and not path.name.endswith(OPTIMIZER_TENSORS):
            models[path.name[: -len(MODEL_SUFFIX)]] = load_file(str(path))
    return models, optimizers, read_state(folder)


def _step_of(path: Path) -> int | None:
    """N of a folder named step-N; None for temporary, aside or foreign names (step-N.tmp-…, step-N.old-…)."""
    digits = path.name[len(CHECKPOINT_PREFIX):]
    if path.name.startswith(CHECKPOINT_PREFIX) and digits.isascii() and digits.isdigit():
        return int(digits)
    return None


def _is_complete(path: Path) -> bool:
    """state.json is written last, so one that parses marks a finished save."""
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):  # missing, unreadable, torn (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        return False
    return True


def complete_checkpoints(root: Path) -> list[Path]:
    """Every complete root/step-N, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = [(n, p) for p in root.iterdir() if (n := _step_of(p)) is not None and p.is_dir() and _is_complete(p)]
    return [p for _, p in sorted(steps)]


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint root/step-N with the highest N, or None."""
    done = complete_checkpoints(root)
    return done[-1] if done else None


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (a learner that only resumes
    from the newest need not keep every one). state.json goes first: a deletion cut short
    leaves an incomplete folder, never a damaged one that looks complete."""
    done = complete_checkpoints(root)
    for folder in done[: max(len(done) - keep, 0)]:
        (folder / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
