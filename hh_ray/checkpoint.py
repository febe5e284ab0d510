"""Checkpoints without pickles: tensors in safetensors, everything else in JSON.

A checkpoint folder is written under a temporary name and renamed when
complete, so a run killed mid-save still has its previous checkpoint, and
`latest_checkpoint` never returns half a save.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON-able rest) of an optimizer's state."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_optimizer(opt: torch.optim.Optimizer, folder: Path, name: str) -> None:
    tensors, meta = optimizer_to_flat(opt)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(meta))


def load_optimizer(opt: torch.optim.Optimizer, folder: Path, name: str) -> None:
    optimizer_from_flat(opt, load_file(str(folder / f"{name}.safetensors")),
                        json.loads((folder / f"{name}.json").read_text()))


def begin(final: Path) -> Path:
    """A fresh temporary folder beside `final`; pass it to `commit` when written."""
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, final: Path) -> Path:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def latest_checkpoint(folder: Path, prefix: str = "iter-") -> Path | None:
    """The newest complete checkpoint `folder/<prefix>N` (by N), or None."""
    if not folder.exists():
        return None
    done = [p for p in folder.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):].isdigit()]
    return max(done, key=lambda p: int(p.name[len(prefix):]), default=None)
