"""Run folders and metric logging: always `metrics.jsonl`, and W&B unless disabled.

A run folder holds:
  config.yaml     the resolved config
  metrics.jsonl   one JSON object per logged step: {"stage", "step", "time", ...}
  samples.jsonl   a few rollouts per PPO iteration: prompt, response, finish reason, reward, KL, version
  pm/ policy/ critic/   models the run made, as HF folders
  checkpoints/    resumable state
  wandb/          W&B run files (offline unless WANDB_API_KEY is set)
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

from hh_ray.config import Config, save_config


def default_run_dir(stage: str) -> Path:
    return Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"


def read_metrics(run_dir: str | Path, stage: str | None = None, last_per_step: bool = False) -> list[dict]:
    """Rows of metrics.jsonl (of one stage). `last_per_step`: steps that were run
    again (after --resume or a learner-group restart) count once, as their last run."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = parse_jsonl_rows(path)
    rows = [r for r in rows if stage is None or r.get("stage") == stage]
    if last_per_step:
        last = {(r.get("stage"), r.get("step")): r for r in rows}
        rows = sorted(last.values(), key=lambda r: (r.get("stage"), r.get("step")))
    return rows


def parse_jsonl_rows(path: Path) -> list[dict]:
    """The rows of a JSONL log. A torn last line (the writer was killed mid-write) is skipped
    with a warning; a bad line anywhere else is an error naming the file and line."""
    lines = [(k, line) for k, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for k, line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            if k != lines[-1][0]:
                raise ValueError(f"{path}:{k}: not a JSON row") from None
            warnings.warn(f"{path}:{k}: skipping a torn last line (the run was stopped while writing it)")
    return rows


def drop_torn_tail(path: Path) -> None:
    """Cut an unfinished last line (a writer killed mid-row) off a JSONL log before appending to it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        warnings.warn(f"{path}: dropping a torn last line (the run was stopped while writing it)")
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class Tracker:
    """One place that logs: metrics.jsonl in the run folder, plus W&B.

    W&B mode 'auto' is online when WANDB_API_KEY is set and offline otherwise,
    so a run never needs the network and `wandb sync` can upload it later.
    """

    def __init__(self, run_dir: str | Path, cfg: Config, stage: str):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        save_config(cfg, self.run_dir / "config.yaml")
        drop_torn_tail(self.run_dir / "metrics.jsonl")  # so a resumed run's first row starts a line of its own
        self._metrics = open(self.run_dir / "metrics.jsonl", "a")
        self._wandb = None
        mode = cfg.tracking.wandb
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            from hh_ray.config import to_dict

            self._wandb = wandb.init(project=cfg.tracking.project, dir=str(self.run_dir), mode=mode,
                                     name=self.run_dir.name, config=to_dict(cfg), job_type=stage,
                                     id=self._wandb_id(), resume="allow")

    def _wandb_id(self) -> str:
        """One W&B run per stage of a run folder, so --resume appends to it."""
        path = self.run_dir / "wandb" / f"run_id-{self.stage}"
        if path.exists():
            return path.read_text().strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        import uuid

        rid = uuid.uuid4().hex[:12]
        path.write_text(rid)
        return rid

    def log(self, step: int, metrics: dict, stage: str | None = None) -> None:
        row = {"stage": stage or self.stage, "step": step, "time": time.time()}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            self._wandb.log({f"{row['stage']}/{k}": v for k, v in row.items()
                             if isinstance(v, (int, float)) and k not in ("step", "time")}, step=None)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """Rollouts to read beside the curves: appended to samples.jsonl, and a W&B table."""
        if not rows:
            return
        with open(self.run_dir / "samples.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **{k: _jsonable(v) for k, v in r.items()}}) + "\n")
        if self._wandb is not None:
            import wandb

            columns = ["step", *rows[0]]
            self._wandb.log({f"{self.stage}/samples": wandb.Table(
                columns=columns, data=[[step, *(_jsonable(r[c]) for c in columns[1:])] for r in rows])})

    def summary(self, values: dict) -> None:
        if self._wandb is not None:
            self._wandb.summary.update({k: _jsonable(v) for k, v in values.items()})

    @property
    def wandb_dir(self) -> str | None:
        return getattr(self._wandb, "dir", None) if self._wandb is not None else None

    def close(self) -> None:
        self._metrics.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
