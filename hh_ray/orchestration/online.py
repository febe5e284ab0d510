"""Iterated online RLHF (Bai et al. 2022, §4.5): rounds of

    deploy the policy snapshots -> collect comparisons between them (people on the
    collection page, or an automatic labeler) -> retrain the PM on all data so far
    -> retrain the policy with PPO against it -> evaluate

with all state in one run folder:

    RUN/config.yaml, metrics.jsonl (stage "online": one row per round)
    RUN/comparisons.sqlite          every pair and label (hh_ray/comparisons.py)
    RUN/online_state.json           which stage of which round is done, the snapshots, the PMs
    RUN/round-K/pm_data.jsonl       the PM's training data of round K (HH format)
    RUN/round-K/pm_run/pm           round K's PM
    RUN/round-K/ppo/policy          round K's policy (snapshot K+1)
    RUN/round-K/summary.json        round K's metrics

Resume: the state file moves on only after a stage has finished, so a
killed run repeats at most the stage it was in, and the PM and PPO stages
continue from their own checkpoints. Collection is resumable by
construction: it tops the round up to `online.comparisons_per_round` labels,
drawing the prompts that follow those already labeled.

Snapshots: round 0 deploys the initial policy and compares two samples of it;
round K > 0 compares the newest snapshot with the one before it, so every
round's labels also rate the snapshots against each other (Elo).

Like controller.py, this module wires actors/, learners/ and serve/ together.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import ray
from ray import serve

from hh_ray.checkpoint import PPO_CHECKPOINTS, latest_checkpoint
from hh_ray.comparisons import ComparisonStore, LabeledPair
from hh_ray.config import Config, ConfigError, save_config
from hh_ray.conversation import model_format, pm_format
from hh_ray.data import Comparison, write_jsonl
from hh_ray.elo import fit_elo, win_matrix
from hh_ray.orchestration.cluster import ensure_ray
from hh_ray.orchestration.controller import train_ppo
from hh_ray.orchestration.sampling import sample_policies
from hh_ray.prompt_stream import PromptStream, load_prompts
from hh_ray.runtime import derive_seed, worker_env
from learners.pm_learner import train_pm
from serve.collect import start_collect

STAGES = ("collect", "pm", "ppo", "evaluate")
STATE_FILE = "online_state.json"


# ---------------------------------------------------------------- pure pieces

def round_dir(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / f"round-{k}"


def snapshot_pair(snapshots: list[str]) -> tuple[str, str]:
    """The two snapshots a round compares: the newest and the one before it (or itself, at first)."""
    return snapshots[-1], snapshots[-2] if len(snapshots) > 1 else snapshots[-1]


def fresh_state(initial_policy: str) -> dict:
    return {"round": 0, "done": [], "snapshots": [initial_policy], "pms": []}


def next_stage(state: dict) -> str | None:
    """The first stage of the current round not yet done."""
    return next((s for s in STAGES if s not in state["done"]), None)


def snapshot_games(labels: list[LabeledPair], names: list[str]) -> list[tuple[int, int, float]]:
    """Elo games (i, j, score of i) from labels between two different snapshots.
    A tie is half a win each; "both bad" says nothing about which is better and is left out."""
    index = {n: i for i, n in enumerate(names)}
    score = {"a": 1.0, "b": 0.0, "tie": 0.5}
    return [(index[lp.snapshot_a], index[lp.snapshot_b], score[lp.choice]) for lp in labels
            if lp.snapshot_a != lp.snapshot_b and lp.choice in score
            and lp.snapshot_a in index and lp.snapshot_b in index]


def snapshot_elo(labels: list[LabeledPair], names: list[str]) -> dict[str, float]:
    """Elo (mean 0) of every snapshot that played at least one game; {} before any."""
    games = snapshot_games(labels, names)
    played = sorted({i for g in games for i in g[:2]})
    if len(played) < 2:
        return {}
    remap = {i: k for k, i in enumerate(played)}
    elo = fit_elo(win_matrix(len(played), [(remap[i], remap[j], s) for i, j, s in games]))
    return {names[i]: float(elo[remap[i]]) for i in played}


def check_online_config(cfg: Config) -> None:
    """What the config loader cannot check alone (its CHOICES and RANGES cover the rest)."""
    o = cfg.online
    if o.collector == "labeler" and not (o.labeler == "rule" or o.labeler.startswith("pm:")):
        raise ConfigError(f"online.labeler: expected 'rule' or 'pm:DIR', got {o.labeler!r}")


def pm_round_config(cfg: Config, data_file: Path, init: str) -> Config:
    """Round config for PM training: the round's comparisons file, the PM initialised from `init`."""
    c = copy.deepcopy(cfg)
    c.data.source, c.data.data_dir, c.data.split, c.data.eval_split = str(data_file), "", "train", ""
    c.data.max_examples = 0
    c.model.pm = init
    return c


def ppo_round_config(cfg: Config, policy: str, pm_dir: str) -> Config:
    c = copy.deepcopy(cfg)
    c.model.policy, c.model.pm = policy, pm_dir
    if cfg.online.ppo_iterations:
        c.ppo.iterations = cfg.online.ppo_iterations
    return c


# ---------------------------------------------------------------- Ray tasks (1 CPU each: Ray sets their torch threads from it)

def _label(spec: str, max_len: int, tie_margin: float, dtype: str, prompts, a, b) -> list[dict]:
    from hh_ray.labelers import make_labeler

    return make_labeler(spec, max_len, tie_margin, dtype).label(prompts, a, b)


def _accuracy(pm_dir: str, comparisons: list[Comparison], max_len: int, dtype: str) -> float:
    from hh_ray.models import load_scalar_head_model
    from hh_ray.pm_eval import accuracy, score_comparisons

    model, tok = load_scalar_head_model(pm_dir, dtype)
    return accuracy(*score_comparisons(model, tok, comparisons, max_len, fmt=pm_format(pm_dir)))


def _remote(fn, *args):

    return ray.get(ray.remote(num_cpus=1)(fn).options(runtime_env={"env_vars": worker_env()}).remote(*args))


# ---------------------------------------------------------------- the loop

class OnlineRLHF:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False):
        from hh_ray.models import load_tokenizer, resolve_model

        check_online_config(cfg)
        self.cfg, self.run_dir = cfg, Path(run_dir).resolve()
        state_path = self.run_dir / STATE_FILE
        if state_path.exists() and not resume:
            raise ValueError(f"{self.run_dir} already holds an online run: pass --resume to continue it, "
                             "or another --run-dir")
        self.initial_policy = resolve_model(cfg.model.policy, cfg.model.cache_dir)
        self.state = json.loads(state_path.read_text()) if state_path.exists() else fresh_state(self.initial_policy)
        self.store = ComparisonStore(cfg.collect.db or self.run_dir / "comparisons.sqlite", cfg.collect.max_text_chars)
        self.tokenizer = load_tokenizer(self.initial_policy)
        # Every snapshot descends from the initial policy: they share its conversation format.
        self.format = model_format(self.initial_policy, cfg.model.conversation_format, self.tokenizer)
        prompts, _ = load_prompts(cfg, self.tokenizer, self.format)
        self.prompts = PromptStream(prompts, cfg.seed + 1)  # not PPO's order: other prompts get labeled first
        ensure_ray()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")  # `--resume` without --config reads it

    def _save_state(self) -> None:
        tmp = self.run_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.run_dir / STATE_FILE)  # atomic: a crash leaves the old state or the new one

    # ---- collect

    def _generate(self, snapshots: tuple[str, str], prompts: list[str], seed: int) -> tuple[list[str], list[str]]:
        """Responses of snapshot a and of snapshot b to every prompt (two samples when a == b)."""
        # Distinct seeds per side: two samples of one snapshot must differ. One snapshot's
        # engines at a time (sample_policies): a machine with GPUs for one set is enough.
        a, b = sample_policies(self.cfg, list(snapshots), prompts, [1, 1],
                               seeds=[derive_seed(seed, "side", k) % 2**31 for k in range(2)])
        return [r[0] for r in a], [r[0] for r in b]

    def _collect_with_labeler(self, k: int, need: int, have: int) -> None:
        o, n = self.cfg.online, self.cfg.online.comparisons_per_round
        prompts = self.prompts.take(k * n + have, need)
        a_snap, b_snap = snapshot_pair(self.state["snapshots"])
        t0 = time.time()
        ra, rb = self._generate((a_snap, b_snap), prompts, seed=derive_seed(self.cfg.seed, "online", k, have) % 2**31)
        t1 = time.time()
        labels = _remote(_label, o.labeler, self.cfg.model.max_seq_len, o.tie_margin, self.cfg.model.dtype,
                         prompts, ra, rb)
        ids = self.store.add_pairs([dict(prompt=p, response_a=x, response_b=y, snapshot_a=a_snap, snapshot_b=b_snap)
                                    for p, x, y in zip(prompts, ra, rb)], round=k, source="labeler")
        self.store.add_labels([{**lab, "pair_id": i} for lab, i in zip(labels, ids)])
        print(f"[online {k}] {need} comparisons labeled by {labels[0]['labeler'] if labels else o.labeler} "
              f"(generate {t1 - t0:.1f}s, label {time.time() - t1:.1f}s)", flush=True)

    def _collect_with_page(self, k: int) -> None:

        c, n = self.cfg.collect, self.cfg.online.comparisons_per_round
        a_snap, b_snap = snapshot_pair(self.state["snapshots"])
        start_collect(dict(policy=a_snap, policy_b=b_snap if b_snap != a_snap else "", db=str(self.store.path),
                           round=k, max_text_chars=c.max_text_chars, max_turns=c.max_turns,
                           max_request_bytes=c.max_request_bytes, max_new_tokens=self.cfg.generation.max_new_tokens,
                           kv_cache_gib=self.cfg.generation.kv_cache_gib, seed=self.cfg.seed + k),
                      c.host, c.port, name="hh-ray-collect")
        print(f"[online {k}] collection page at http://{c.host}:{c.port}/ : waiting for {n} labels", flush=True)
        try:
            last = -1
            while (have := self.store.count_labels(round=k)) < n:
                if have != last:
                    print(f"[online {k}] {have}/{n} labels", flush=True)
                    last = have
                time.sleep(2)
        finally:
            serve.delete("hh-ray-collect")

    def collect(self, k: int) -> dict:
        n = self.cfg.online.comparisons_per_round
        have = self.store.count_labels(round=k)
        if have < n:
            if self.cfg.online.collector == "page":
                self._collect_with_page(k)
            else:
                self._collect_with_labeler(k, n - have, have)
        fresh, skipped = self.store.training_comparisons((k, k))
        return {"comparisons_collected": self.store.count_labels(round=k), "comparisons_trainable": len(fresh),
                **{f"comparisons_{s}": v for s, v in skipped.items()}}

    # ---- PM

    def train_round_pm(self, k: int) -> dict:
        from hh_ray.pm_eval import pm_comparisons

        o, rd = self.cfg.online, round_dir(self.run_dir, k)
        rd.mkdir(parents=True, exist_ok=True)
        continuing = o.pm_init == "continue" and bool(self.state["pms"])
        collected, _ = self.store.training_comparisons((k, k) if continuing else (0, k))
        base = pm_comparisons(self.cfg)[0] if o.base_data and not continuing else []
        data_file = rd / "pm_data.jsonl"
        write_jsonl(base + collected, data_file)
        init = self.state["pms"][-1] if continuing else self.cfg.model.pm
        run = rd / "pm_run"
        pm_dir = train_pm(pm_round_config(self.cfg, data_file, init), run,
                          resume=latest_checkpoint(run / "checkpoints") is not None)
        if not (Path(pm_dir) / "config.json").exists():
            raise RuntimeError(f"round {k}: PM training did not finish ({pm_dir})")
        self.state["pms"].append(str(pm_dir))
        return {"pm_train_pairs": len(base) + len(collected), "pm_collected_pairs": len(collected),
                "pm_base_pairs": len(base)}

    def fresh_accuracy(self, k: int) -> dict:
        """The paper's question per round: does the PM rank this round's new comparisons right?
        `before`: the previous round's PM, which never saw them (held out); `after`: this round's."""
        fresh, _ = self.store.training_comparisons((k, k))
        out = {}
        if not fresh:
            return out
        m = self.cfg.model
        pms = self.state["pms"]
        if len(pms) >= 2:
            out["pm_accuracy_fresh_before"] = _remote(_accuracy, pms[-2], fresh, m.max_seq_len, m.dtype)
        out["pm_accuracy_fresh_after"] = _remote(_accuracy, pms[-1], fresh, m.max_seq_len, m.dtype)
        return out

    # ---- PPO

    def train_round_policy(self, k: int) -> dict:
        from hh_ray.tracking import read_metrics

        start = self.initial_policy if self.cfg.online.policy_init == "initial" else self.state["snapshots"][-1]
        ppo_dir = round_dir(self.run_dir, k) / "ppo"
        train_ppo(ppo_round_config(self.cfg, start, self.state["pms"][-1]), ppo_dir,
                  resume=latest_checkpoint(ppo_dir / PPO_CHECKPOINTS) is not None)
        self.state["snapshots"].append(str(ppo_dir / "policy"))
        evals = read_metrics(ppo_dir, "ppo_eval")
        return {"policy_reward_latest_pm_before": evals[0]["reward_pm_heldout"] if len(evals) > 1 else None,
                "policy_reward_latest_pm": evals[-1]["reward_pm_heldout"] if evals else None}

    # ---- one round, all rounds

    def run_round(self, k: int) -> dict:
        rd = round_dir(self.run_dir, k)
        rd.mkdir(parents=True, exist_ok=True)
        partial_path = rd / "summary.partial.json"
        metrics = json.loads(partial_path.read_text()) if partial_path.exists() else {"round": k}
        while (stage := next_stage(self.state)) is not None:
            t0 = time.time()
            print(f"[online {k}] {stage}", flush=True)
            if stage == "collect":
                metrics.update(self.collect(k))
            elif stage == "pm":
                metrics.update(self.train_round_pm(k))
                metrics.update(self.fresh_accuracy(k))
            elif stage == "ppo":
                metrics.update(self.train_round_policy(k))
            else:
                labels = self.store.labeled_pairs((0, k))
                elo = snapshot_elo(labels, self.state["snapshots"])
                metrics.update(snapshot_elo=elo, comparisons_total=len(labels),
                               snapshot=self.state["snapshots"][-1], pm=self.state["pms"][-1])
            metrics[f"time_{stage}"] = time.time() - t0
            partial_path.write_text(json.dumps(metrics, indent=1))  # before the state: never a stage lost
            self.state["done"].append(stage)
            self._save_state()
        (rd / "summary.json").write_text(json.dumps(metrics, indent=1))
        self._log(k, metrics)
        return metrics

    def _log(self, k: int, metrics: dict) -> None:
        """One metrics.jsonl row (and W&B step) per round. The tracker is opened only here:
        W&B holds one run per process, and the PM and PPO stages open their own meanwhile."""
        from hh_ray.tracking import Tracker

        tracker = Tracker(self.run_dir, self.cfg, "online")
        try:
            tracker.log(k, {key: v for key, v in metrics.items() if not isinstance(v, (dict, list))})
            for snap, elo in metrics.get("snapshot_elo", {}).items():
                tracker.log(k, {"snapshot": snap, "elo": elo}, stage="online_elo")
        finally:
            tracker.close()

    def run(self) -> list[dict]:
        rounds = []
        while self.state["round"] < self.cfg.online.rounds:
            k = self.state["round"]
            rounds.append(self.run_round(k))
            print(format_round(rounds[-1]), flush=True)
            self.state.update(round=k + 1, done=[])
            self._save_state()
        return rounds


def format_round(m: dict) -> str:
    def f(key):
        v = m.get(key)
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    elo = ", ".join(f"{Path(s).parent.parent.name if s.endswith('policy') else 'initial'} {e:+.0f}"
                    for s, e in m.get("snapshot_elo", {}).items())
    return (f"[online {m['round']}] collected {f('comparisons_collected')} (trainable {f('comparisons_trainable')}), "
            f"PM trained on {f('pm_train_pairs')}; PM accuracy on this round's data: previous PM "
            f"{f('pm_accuracy_fresh_before')}, new PM {f('pm_accuracy_fresh_after')}; policy reward under the "
            f"latest PM {f('policy_reward_latest_pm_before')} -> {f('policy_reward_latest_pm')}; Elo: {elo or '-'}")


def online(cfg: Config, run_dir: Path, resume: bool = False) -> list[dict]:
    """`hh-ray online`: run (or continue) the rounds; returns every finished round's metrics."""
    loop = OnlineRLHF(cfg, run_dir, resume)
    loop.run()
    return [json.loads((round_dir(loop.run_dir, k) / "summary.json").read_text())
            for k in range(loop.state["round"])]
