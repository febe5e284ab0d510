"""The one checkpoint format of every learner: tensors in safetensors, the rest in JSON.

A checkpoint is a folder root/step-NNNNNN holding, for each named model,
<name>.safetensors (its full state dict), for each named optimizer
<name>.optimizer.safetensors + <name>.optimizer.json (its full state dict keyed
by parameter *name*, so it loads whatever the wrapping: DDP, FSDP or none), and
manifest.json (every other file's size and SHA-256) and state.json (the
learner's position), written last. No pickles.

Writes are atomic: the folder is built under a temporary name, synced, and
renamed into place, so a run killed at any moment keeps a complete checkpoint
and `latest_checkpoint` never returns half a save. Reads check the manifest
(`verify_checkpoint`): a file that was cut, lost or changed on disk is an error
naming it, and `resume_checkpoint` passes over such a checkpoint to the one
before, saying why. `clean_leftovers` removes what a killed save left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "step-"
# PPO's checkpoints, under a run folder. Apart from the supervised learners' (run/checkpoints):
# the demo trains its PM and runs PPO in one folder, and their step numbers would collide.
PPO_CHECKPOINTS = Path("checkpoints") / "ppo"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
MODEL_SUFFIX = ".safetensors"
OPTIMIZER_TENSORS = ".optimizer.safetensors"
OPTIMIZER_META = ".optimizer.json"


class CheckpointError(ValueError):
    """A checkpoint that is incomplete or differs from its manifest; the message names the folder and file."""


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


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sha256s(paths: list[Path]) -> list[str]:
    """The files' SHA-256s, hashed in parallel (hashlib releases the GIL: ~1 GB/s per core)."""
    if len(paths) < 2:
        return [_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(_sha256, paths))


def _write_files(folder: Path, models: dict, optimizers: dict, state: dict) -> None:
    """Every file of a checkpoint into `folder`, each synced: the tensors and their JSON,
    then manifest.json (every file's size and SHA-256, state.json's included), then
    state.json last, so a state.json on disk means the manifest before it is whole."""
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
    state_bytes = json.dumps(state, indent=1).encode()
    files = {p.name: {"size": p.stat().st_size, "sha256": h} for p, h in zip(written, _sha256s(written))}
    files[STATE_FILE] = {"size": len(state_bytes), "sha256": hashlib.sha256(state_bytes).hexdigest()}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1))
    _fsync(folder / MANIFEST_FILE)
    (folder / STATE_FILE).write_bytes(state_bytes)
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


def model_file(folder: Path, name: str) -> Path:
    """The file of one model's state dict in a checkpoint (e.g. a PPO checkpoint's policy, for
    generation workers to load and sample), checked against the manifest first."""
    verify_checkpoint(folder, [f"{name}{MODEL_SUFFIX}"])
    return Path(folder) / f"{name}{MODEL_SUFFIX}"


def verify_checkpoint(folder: Path, names: list[str] | None = None) -> dict:
    """The manifest of a checkpoint whose every file (or those `names`) is there with the size
    and SHA-256 the manifest records; else CheckpointError naming the folder and the first
    file that differs."""
    folder = Path(folder)
    if not (folder / STATE_FILE).exists():
        raise CheckpointError(f"{folder}: incomplete, no {STATE_FILE} (its save or deletion was cut short)")
    try:
        files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {MANIFEST_FILE} (damaged, or older than checkpoint manifests)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}: {MANIFEST_FILE} is damaged ({e})") from None
    names = list(files) if names is None else names
    for name in names:  # sizes first: cheap, and what a cut-short copy shows
        if name not in files:
            raise CheckpointError(f"{folder}: {name} is not in its {MANIFEST_FILE}")
        path, want = folder / name, files[name]
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing (listed in {MANIFEST_FILE})")
        if path.stat().st_size != want["size"]:
            raise CheckpointError(f"{folder}: {name} is {path.stat().st_size} bytes, "
                                  f"{MANIFEST_FILE} says {want['size']}")
    for name, got in zip(names, _sha256s([folder / n for n in names])):
        if got != files[name]["sha256"]:
            raise CheckpointError(f"{folder}: {name} differs from {MANIFEST_FILE} (SHA-256 {got[:12]}…, "
                                  f"expected {files[name]['sha256'][:12]}…): damaged on disk")
    return files


def read_checkpoint(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict], dict]:
    """(models, optimizers, state) of a checkpoint folder, keyed as write_checkpoint was given them.
    Checked against its manifest first (CheckpointError names a file that differs)."""
    folder = Path(folder)
    files = verify_checkpoint(folder)
    models, optimizers = {}, {}
    for fname in sorted(files):
        path = folder / fname
        if fname.endswith(OPTIMIZER_META):
            name = fname[: -len(OPTIMIZER_META)]
            optimizers[name] = optimizer_from_files(load_file(str(folder / f"{name}{OPTIMIZER_TENSORS}")),
                                                    json.loads(path.read_text()))
        elif fname.endswith(MODEL_SUFFIX) and not fname.endswith(OPTIMIZER_TENSORS):
            models[fname[: -len(MODEL_SUFFIX)]] = load_file(str(path))
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
    """The complete checkpoint root/step-N with the highest N, or None (not verified: see resume_checkpoint)."""
    done = complete_checkpoints(root)
    return done[-1] if done else None


def step_folders(root: Path) -> list[Path]:
    """Every root/step-N folder, complete or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = [(n, p) for p in root.iterdir() if (n := _step_of(p)) is not None and p.is_dir()]
    return [p for _, p in sorted(steps)]


def resume_checkpoint(root: Path, log=print) -> Path | None:
    """The newest checkpoint under root that verifies against its manifest, or None: what every
    resume starts from (`--resume`, a restarted learner group). Each newer one passed over,
    corrupt or incomplete, is reported through `log` with the reason."""
    skipped = []
    for folder in reversed(step_folders(root)):
        try:
            verify_checkpoint(folder)
        except CheckpointError as e:
            skipped.append(folder.name)
            log(f"checkpoint: skipping {e}")
            continue
        if skipped:
            log(f"checkpoint: resuming from {folder}, the newest that verifies (skipped {', '.join(skipped)})")
        return folder
    return None


def no_checkpoint_error(root: Path) -> CheckpointError:
    """The error of a --resume that found nothing to continue from, saying where it looked."""
    seen = step_folders(root)
    why = (f"all {len(seen)} there are corrupt or incomplete (see above)" if seen
           else "none was written" if Path(root).is_dir() else "the folder does not exist")
    return CheckpointError(f"--resume: no usable checkpoint under {root}: {why}; "
                           "start over with another --run-dir")


_LEFTOVER = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)\.(tmp|old)-\d+$")


def clean_leftovers(root: Path, recover: bool = True, log=print) -> list[Path]:
    """Remove what killed saves left under root (step-N.tmp-PID, step-N.old-PID); returns what
    was removed. Called where a run starts, before any learner writes. A kill between the two
    renames of an overwrite leaves no step-N at all, only these: with `recover`, the one that
    verifies (the new save, else the old one) is renamed back into place first."""
    root = Path(root)
    if not root.is_dir():
        return []
    groups: dict[str, list[Path]] = {}
    for p in root.iterdir():
        if m := _LEFTOVER.match(p.name):
            groups.setdefault(f"{CHECKPOINT_PREFIX}{m.group(1)}", []).append(p)
    removed = []
    for final, found in sorted(groups.items()):
        if recover and not (root / final).exists():
            for cand in sorted(found, key=lambda p: ".tmp-" not in p.name):  # the newer save first
                try:
                    verify_checkpoint(cand)
                except CheckpointError:
                    continue
                os.rename(cand, root / final)
                _fsync(root)
                found.remove(cand)
                log(f"checkpoint: recovered {root / final} from {cand.name} (a save was killed mid-swap)")
                break
        for p in found:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log(f"checkpoint: removed {len(removed)} leftover(s) of killed saves under {root}: "
            f"{', '.join(p.name for p in removed)}")
    return removed


def prune_checkpoints(root: Path, keep: int, protect: Path | None = None) -> None:
    """Delete all but the newest `keep` complete checkpoints (0 = keep all), and the incomplete
    step-N folders older than those (what a deletion cut short left). `protect` is never
    deleted (e.g. the checkpoint a restarted learner group reloads first). state.json goes
    first: a deletion cut short leaves an incomplete folder, never a damaged one that looks complete."""
    if keep <= 0:
        return
    done = complete_checkpoints(root)
    if len(done) <= keep:
        return
    oldest_kept = _step_of(done[-keep])
    protect = Path(protect).resolve() if protect else None
    for folder in step_folders(root):
        if _step_of(folder) >= oldest_kept or folder.resolve() == protect:
            continue
        (folder / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)


def ppo_run_in(run_dir: Path) -> list[str]:
    """What shows a PPO run in run_dir: anything under checkpoints/ppo, PPO rows in metrics.jsonl."""
    run_dir, signs = Path(run_dir), []
    root = run_dir / PPO_CHECKPOINTS
    if root.is_dir() and (entries := sorted(p.name for p in root.iterdir())):
        signs.append(f"{root} holds {', '.join(entries[:3])}{', …' if len(entries) > 3 else ''}")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        from hh_ray.tracking import parse_jsonl_rows

        rows = [r for r in parse_jsonl_rows(metrics) if str(r.get("stage", "")).startswith("ppo")]
        if rows:
            signs.append(f"{metrics} has {len(rows)} PPO row(s)")
    return signs


def ppo_checkpoint_to_resume(run_dir: Path, resume: bool) -> Path | None:
    """`train-ppo`'s checks before anything starts: the checkpoint --resume continues from (an
    error when none verifies), or None for a fresh run, which a folder that already holds a
    PPO run refuses. A refusal writes nothing."""
    root = Path(run_dir) / PPO_CHECKPOINTS
    if not resume:
        if signs := ppo_run_in(run_dir):
            raise ValueError(f"{run_dir} already holds a PPO run ({'; '.join(signs)}): pass --resume to continue "
                             "it, or another --run-dir")
        return None
    clean_leftovers(root)
    ckpt = resume_checkpoint(root)
    if ckpt is None:
        raise no_checkpoint_error(root)
    return ckpt
