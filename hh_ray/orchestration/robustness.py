"""`hh-ray eval robustness`, the command: split the comparisons, train the train PM and
the test PM, run PPO against the train PM, score every checkpoint with both
(the math and the table are `hh_ray.robustness`)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from hh_ray.checkpoint import PPO_CHECKPOINTS, complete_checkpoints, model_file, read_state
from hh_ray.config import set_value
from hh_ray.conversation import pm_format
from hh_ray.data import write_jsonl
from hh_ray.models import is_scalar_head_model, load_scalar_head_model, resolve_model
from hh_ray.orchestration.controller import train_ppo
from hh_ray.orchestration.sampling import PolicySampler
from hh_ray.pm_eval import pm_comparisons
from hh_ray.robustness import RULE, checkpoint_kl, divergence_point, plot_robustness, robustness_table, split_comparisons
from hh_ray.sampling import score_samples
from hh_ray.tracking import read_metrics
from learners.pm_learner import train_pm


def _data_folder(folder: Path, train: list, test: list) -> Path:
    """A local comparison source with train.jsonl and test.jsonl, which train-pm and train-ppo read as
    data.split=train / data.eval_split=test: the learners run unchanged on exactly these pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, folder / "train.jsonl")
    write_jsonl(test, folder / "test.jsonl")
    return folder


def _on_data(cfg, folder: Path, **overrides):
    c = copy.deepcopy(cfg)
    for k, v in {"data.source": str(folder), "data.data_dir": "", "data.split": "train", "data.eval_split": "test",
                 "data.max_examples": 0, **overrides}.items():
        set_value(c, k, v)
    return c


def policy_checkpoints(ppo_dir: Path) -> list[tuple[int, Path]]:
    """(iteration, checkpoint folder) of every complete PPO checkpoint, in order."""
    return [(read_state(p)["iteration"], p) for p in complete_checkpoints(Path(ppo_dir) / PPO_CHECKPOINTS)]


def train_both_pms(cfg, folder: Path, half_train: list, half_test: list, held_out: list) -> dict[str, str]:
    """The train PM and the test PM, one per half; reused when an earlier (interrupted)
    run of this command finished them in the same folder."""
    pms = {}
    for name, half in (("train_pm", half_train), ("test_pm", half_test)):
        pm_run = folder / name
        if is_scalar_head_model(str(pm_run / "pm")):
            print(f"robustness: reusing {pm_run / 'pm'}", flush=True)
        else:
            print(f"robustness: training the {name.replace('_', '-')} on {len(half)} comparisons", flush=True)
            train_pm(_on_data(cfg, _data_folder(folder / "data" / name, half, held_out)), pm_run)
        pms[name] = str(pm_run / "pm")
    return pms


def score_checkpoints(cfg, checkpoints: list, pms: dict[str, str], prompts: list[str], samples_per_prompt: int) -> dict:
    """{PM name: mean score of each checkpoint's samples on the held-out prompts}."""
    policy0 = resolve_model(cfg.model.policy, cfg.model.cache_dir)
    samples = []
    with PolicySampler(cfg, policy0) as sampler:  # engines start with π₀
        for k, (it, path) in enumerate(checkpoints):
            if k:  # the same seeds for every checkpoint (PolicySampler): the draw is common
                sampler.load(k, [str(model_file(path, "policy"))])
            samples.append(sampler.sample(prompts, samples_per_prompt))
            print(f"robustness: sampled iteration {it} ({len(prompts)} prompts × {samples_per_prompt})", flush=True)
    rewards = {}
    for name, pm_dir in pms.items():
        pm, pm_tok = load_scalar_head_model(pm_dir, cfg.model.dtype)
        rewards[name] = [float(score_samples(pm, pm_tok, prompts, s, cfg.model.max_seq_len, fmt=pm_format(pm_dir)).mean())
                         for s in samples]
        del pm
    return rewards


def print_table(table: list[dict], finding: str, folder: Path) -> None:
    print(f"{'iter':>4} {'√KL':>7} {'(of v)':>6} {'train PM':>9} {'test PM':>9} {'gap':>7}  (gains over π₀)")
    for r in table:
        print(f"{r['iteration']:>4} {r['sqrt_kl']:>7.3f} {r['kl_of_version']:>6} {r['gain_train_pm']:>+9.4f} "
              f"{r['gain_test_pm']:>+9.4f} {r['gap']:>+7.3f}")
    print(finding)
    print(f"saved to {folder}")


def eval_robustness(cfg, run_dir: Path, args) -> int:
    folder = Path(run_dir) / "robustness"
    train, held_out = pm_comparisons(cfg)
    half_train, half_test = split_comparisons(train, cfg.seed)
    print(f"robustness: {len(train)} comparisons → train-PM half {len(half_train)}, test-PM half "
          f"{len(half_test)}; {len(held_out)} held out (prompts for scoring, PM accuracy)", flush=True)
    pms = train_both_pms(cfg, folder, half_train, half_test, held_out)

    ppo_dir = folder / "ppo"
    if not (ppo_dir / "policy" / "config.json").exists():
        print(f"robustness: PPO against the train PM, checkpoint every {cfg.ppo.checkpoint_every} iterations",
              flush=True)
        # PPO draws its prompts from all training comparisons, never from the held-out ones scored below.
        # Every checkpoint is scored below, so none is pruned; a run cut short continues.
        train_ppo(_on_data(cfg, _data_folder(folder / "data" / "ppo", train, held_out),
                           **{"model.pm": pms["train_pm"], "ppo.keep_checkpoints": 0}),
                  ppo_dir, resume=bool(complete_checkpoints(ppo_dir / PPO_CHECKPOINTS)))
    ppo_rows = read_metrics(ppo_dir, "ppo", last_per_step=True)
    checkpoints = [(0, None)] + policy_checkpoints(ppo_dir)
    if len(checkpoints) == 1:  # a curve of π₀ alone would report "no divergence" about nothing
        raise FileNotFoundError(f"robustness: PPO left no complete checkpoint in {ppo_dir / PPO_CHECKPOINTS}")
    prompts = list(dict.fromkeys(c.prompt for c in held_out))[: args.num_prompts]
    rewards = score_checkpoints(cfg, checkpoints, pms, prompts, args.samples_per_prompt)

    iterations = [it for it, _ in checkpoints]
    kls = [checkpoint_kl(ppo_rows, it) for it in iterations]
    table = robustness_table(iterations, [kl for kl, _ in kls], rewards["train_pm"], rewards["test_pm"],
                             [v for _, v in kls])
    k, why = divergence_point(rewards["train_pm"], rewards["test_pm"], args.gap_threshold, args.min_move)
    pm_acc = {}
    for name in pms:
        ev = folder / name / "pm_eval" / "pm_eval.json"  # train_pm's held-out evaluation
        if ev.exists():
            pm_acc[f"{name}_heldout_accuracy"] = json.loads(ev.read_text()).get("accuracy")
    finding = (f"The curves part at iteration {table[k]['iteration']} (√KL = {table[k]['sqrt_kl']:.3f}): {why}."
               if k is not None else f"No divergence: {why}.")
    results = {"method": (f"{len(train)} training comparisons split 50:50 by seed {cfg.seed} "
                          f"({len(half_train)} / {len(half_test)}); one PM trained on each half; PPO against the "
                          f"train PM for {cfg.ppo.iterations} iterations, checkpoint every {cfg.ppo.checkpoint_every}; "
                          f"each checkpoint and π₀ sampled on {len(prompts)} held-out prompts × "
                          f"{args.samples_per_prompt} (vLLM, as PPO's rollouts; the same seeds for each), mean score by both PMs. Curves are "
                          "gains over π₀; KL from the PPO metrics, measured on the rollouts of the policy version in "
                          "kl_of_version (the checkpoint's own, or the one before for the last). Divergence: " + RULE
                          + f"; threshold {args.gap_threshold:g}, min_move {args.min_move:g}."),
               "finding": finding,
               "divergence_iteration": table[k]["iteration"] if k is not None else "none",
               "divergence_sqrt_kl": table[k]["sqrt_kl"] if k is not None else "none",
               "gap_threshold": args.gap_threshold, "min_move": args.min_move, "split_seed": cfg.seed,
               "train_pm_comparisons": len(half_train), "test_pm_comparisons": len(half_test),
               **pm_acc, "train_pm": pms["train_pm"], "test_pm": pms["test_pm"], "ppo_run": str(ppo_dir),
               "table": table}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "robustness.json").write_text(json.dumps(results, indent=2))
    plot_robustness(table, k, folder / "robustness.png")
    print_table(table, finding, folder)
    return 0
