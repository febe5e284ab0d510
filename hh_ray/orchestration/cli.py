"""`hh-ray` command line: one subcommand per stage of the paper's method.

Every stage takes --config FILE, --run-dir DIR, --resume and every config
field as a flag (`--ppo.kl_coef 0.01`) or as `key=value`; `--help` lists
each with its default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hh_ray.config import Config, ConfigError, flat_fields, load_config, set_value

STAGES = {
    "demo": "Run the whole method end to end on the embedded default (SmolLM2-135M, synthetic comparisons): PM, then PPO, then the report.",
    "prepare-model": "Build or convert a local model ('tiny' or 'smollm2') once and print its folder.",
    "train-pm": "Train the preference model (optional PMP stage, then HH finetuning) on a Ray Train learner group.",
    "eval": "The paper's evaluations: `eval pm` (accuracy, accuracy by turn, calibration), `eval best-of-n` "
            "(rejection sampling vs analytic KL), `eval elo` (checkpoints rated with the PM as judge), "
            "`eval ood` (harmful-request detection per layer; saves a detector for serve), `eval robustness` "
            "(train-PM vs test-PM: PPO against one half's PM, scored by the other's).",
    "distill": "Context distillation of an HHH prompt into the policy (KL over the teacher's top-k tokens + rest) on a Ray Train learner group; writes RUN/policy.",
    "sft": "Supervised finetuning on the chosen responses of HH comparisons (loss on Assistant tokens only); writes RUN/policy.",
    "train-ppo": "PPO against the PM with a KL penalty: vLLM actors generate, Ray Train learners update.",
    "online": "Iterated online RLHF: rounds of deploy snapshots -> collect comparisons (automatic labeler or the "
              "collection page) -> retrain the PM on all data -> PPO -> evaluate (PM accuracy, reward, Elo); resumable.",
    "collect": "Comparison collection page on Ray Serve: chat, see two responses per turn, pick the better one "
               "(keys 1/2, t tie, b both bad); labels go to the SQLite database (--collect.db).",
    "serve": "Serve a trained policy with Ray Serve: OpenAI-compatible chat completions, best-of-n with the PM, OOD flag.",
    "report": "Write RUN_DIR/report.html: config, metric curves, reward vs sqrt(KL) and every evaluation found in the run folder.",
}


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/); flags below override it")
    p.add_argument("--run-dir", help="run folder (default: runs/<stage>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its newest checkpoint that verifies (corrupt or "
                        "incomplete newer ones are skipped, and said so); without it a folder that holds a run "
                        "of the stage is refused")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume (train-pm, distill, sft, train-ppo): accept a config whose seed, batch "
                        "sizes, models or data differ from the run's config.yaml (refused otherwise, as the "
                        "checkpoint's position would mean something else)")
    defaults = Config()
    g = p.add_argument_group("config (section.field, default in brackets)")
    for name, f in flat_fields().items():
        obj = defaults
        for part in name.split("."):
            obj = getattr(obj, part)
        g.add_argument(f"--{name}", dest=f"cfg:{name}", metavar="V", default=None,
                       help=f"{f.metadata.get('help', '')} [{obj!r}]".replace("%", "%%"))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more overrides, e.g. ppo.kl_coef=0.01")


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, help="policy folder (or 'tiny' / 'smollm2')")
    p.add_argument("--pm", default="", help="PM folder: enables best-of-n")
    p.add_argument("--best-of-n", type=int, default=1, help="candidates per response, the PM picks the best (needs --pm)")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas, one vLLM engine each")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; off loopback an API key is required")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--api-key", default="", help="Bearer key required on every route (default: $HH_RAY_API_KEY)")
    p.add_argument("--ood", default="", help="OOD detector folder (from `eval ood`): adds an OOD score to every response")
    p.add_argument("--ood-refuse", action="store_true", help="refuse prompts the OOD detector flags")
    # Load limits (serve/load.py): defaults and help from LoadArgs; a flag left out keeps the default.
    from serve.load import LoadArgs

    g = p.add_argument_group("load limits")
    for name, kind, extra in (("body_timeout_s", float, {}), ("generation_timeout_s", float, {}),
                              ("max_ongoing_requests", int, {}), ("max_queued_requests", int, {}),
                              ("queue_full_status", int, {"choices": [503, 429]}), ("retry_after_s", float, {}),
                              ("health_check_period_s", float, {}), ("health_check_timeout_s", float, {})):
        f = LoadArgs.model_fields[name]
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, metavar="V", **extra,
                       help=f"{f.description} [{f.default}]".replace("%", "%%"))
    g.add_argument("--allowed-host", dest="allowed_hosts", action="append", default=None, metavar="NAME",
                   help=LoadArgs.model_fields["allowed_hosts"].description + " Repeatable.")


def _add_collect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, help="policy snapshot A (folder, or 'tiny' / 'smollm2')")
    p.add_argument("--policy-b", default="", help="snapshot B; without it the two responses are two samples of A")
    p.add_argument("--round", type=int, default=0, help="online round the collected pairs belong to")
    p.add_argument("--api-key", default="", help="Bearer key the page's API requires (default: $HH_RAY_API_KEY)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    """The flags of these evaluations, added to `hh-ray eval`'s parser."""
    g = p.add_argument_group("best-of-n / elo / ood")
    g.add_argument("--policy", help="policy to sample from (best-of-n: π₀) or read activations of (ood); "
                                    "default model.policy")
    g.add_argument("--policies", nargs="+", help="elo: policy folders to rate (default: model.policy and RUN_DIR/policy)")
    g.add_argument("--num-prompts", type=int, default=32, help="held-out prompts (ood: per set)")
    g.add_argument("--n-max", type=int, default=16, help="best-of-n: samples per prompt (n = 1, 2, 4, … up to this)")
    g.add_argument("--helpful", default="synthetic", help="ood: in-distribution comparisons (source)")
    g.add_argument("--harmful", help="ood: harmful-request comparisons (default data.source)")
    g.add_argument("--layers", type=int, nargs="+", help="ood: hidden_states indices (default L/4, L/2, 3L/4, L)")
    g.add_argument("--shots", type=int, nargs="+", help="ood: k harmful examples for the probe (default 1 4 16)")
    g.add_argument("--ridge", type=float, default=1e-2, help="ood: covariance ridge, × mean unit variance")
    g = p.add_argument_group("robustness")
    g.add_argument("--samples-per-prompt", type=int, default=2,
                   help="robustness: responses per held-out prompt and checkpoint (--num-prompts prompts)")
    g.add_argument("--gap-threshold", type=float, default=0.5,
                   help="robustness: the curves part where train-PM gain − test-PM gain exceeds this "
                        "(PM units, log-odds), or where train rises while test falls")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hh-ray",
        description="Helpful & harmless RLHF (Bai et al. 2022) on Ray: preference models, PPO with a KL "
                    "penalty, iterated online training and the paper's evaluations.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage, help in STAGES.items():
        p = sub.add_parser(stage, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if stage == "prepare-model":
            p.add_argument("name", help="'tiny' or 'smollm2' (or any HF name/folder, passed through)")
            p.add_argument("--cache-dir", default="", help="cache folder (default ~/.cache/hh-ray or $HH_RAY_CACHE)")
            continue
        if stage == "report":  # reads files only: no config flags
            p.add_argument("run", metavar="RUN_DIR", help="run folder (config.yaml, metrics.jsonl, eval folders)")
            p.add_argument("--out", help="HTML file to write (default RUN_DIR/report.html)")
            continue
        if stage == "serve":
            _add_serve_args(p)
        if stage == "collect":
            _add_collect_args(p)
        if stage == "eval":
            p.add_argument("what", choices=["pm", "best-of-n", "elo", "ood", "robustness"], help="which evaluation")
            p.add_argument("--pm", required=False, help="trained PM folder")
            p.add_argument("--data", help="comparisons to evaluate on (default: the config's data, held-out part)")
            _add_eval_args(p)
        _add_config_flags(p)
    return parser


def resolve(args: argparse.Namespace) -> tuple[Config, Path]:
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    for item in args.overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        k, v = item.split("=", 1)
        overrides[k.lstrip("-")] = v
    if args.resume and not args.run_dir:
        raise ConfigError("--resume needs --run-dir (the run to continue)")
    saved = Path(args.run_dir or ".") / "config.yaml"
    # Resuming without --config continues the run's own config (the overrides on top of it).
    cfg = load_config(saved if args.resume and saved.exists() and not args.config else args.config, overrides)
    from hh_ray.tracking import default_run_dir

    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.stage)
    # The stages that resume from checkpoints refuse a mixed or unusable run folder here, before Ray
    # starts: a changed config (nothing written), a used folder without --resume (nothing written),
    # --resume with no checkpoint that verifies (leftovers of killed saves cleaned first).
    section = {"train-ppo": "ppo", "train-pm": "pm", "distill": "distill", "sft": "sft"}.get(args.stage)
    if section and args.resume and saved.exists() and not args.allow_config_change:
        from hh_ray.config import resume_mismatches

        differ = resume_mismatches(load_config(saved), cfg, section)
        if differ:
            raise ConfigError(f"--resume: the config differs from the run's ({saved}) in {'; '.join(differ)}; "
                              "pass --allow-config-change to resume anyway")
    if section == "ppo":
        from hh_ray.checkpoint import ppo_checkpoint_to_resume

        ppo_checkpoint_to_resume(run_dir, args.resume)
    elif section:
        from learners.group import checkpoint_to_resume

        checkpoint_to_resume(run_dir, args.resume)
    return cfg, run_dir


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    try:
        for flag in unknown:  # a mistyped --section.key: name the closest real one (exit 2 like argparse)
            if not flag.startswith("--") or "." not in flag:
                parser.error(f"unrecognized arguments: {' '.join(unknown)}")
            set_value(Config(), flag[2:].split("=", 1)[0], None, where="command line")
        if args.stage == "prepare-model":
            from hh_ray.models import resolve_model

            print(Path(resolve_model(args.name, args.cache_dir)).resolve())
            return 0
        if args.stage == "report":
            from hh_ray.report import write_report

            print(f"report written to {write_report(args.run, args.out)}")
            return 0
        cfg, run_dir = resolve(args)
        if args.stage not in ("eval",) or args.what != "pm":  # every stage but these runs on Ray
            from hh_ray.orchestration.cluster import ensure_ray

            ensure_ray()
        return STAGE_RUNNERS[args.stage](cfg, run_dir, args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"hh-ray {args.stage}: error: {e}", file=sys.stderr)
        return 2


def run_train_pm(cfg: Config, run_dir: Path, args) -> int:
    from learners.pm_learner import train_pm

    out = train_pm(cfg, run_dir, resume=args.resume)
    print(f"PM written to {out}")
    return 0


def run_eval(cfg: Config, run_dir: Path, args) -> int:
    if args.what != "pm":
        from hh_ray.orchestration import eval_commands

        return eval_commands.run(args.what, cfg, run_dir, args)
    from hh_ray.pm_eval import eval_pm_command

    return eval_pm_command(cfg, run_dir, pm_dir=args.pm, data=args.data)


def run_train_ppo(cfg: Config, run_dir: Path, args) -> int:
    from hh_ray.orchestration.controller import train_ppo

    train_ppo(cfg, run_dir, resume=args.resume)
    return 0


def run_demo(cfg: Config, run_dir: Path, args) -> int:
    from hh_ray.orchestration.demo import demo

    return demo(cfg, run_dir, resume=args.resume)


def run_serve(cfg: Config, run_dir: Path, args) -> int:
    from serve.app import run_forever

    g = cfg.generation
    limits = {k: getattr(args, k) for k in ("body_timeout_s", "generation_timeout_s", "max_ongoing_requests",
                                            "max_queued_requests", "queue_full_status", "retry_after_s",
                                            "health_check_period_s", "health_check_timeout_s", "allowed_hosts")
              if getattr(args, k) is not None}
    return run_forever(dict(policy=args.policy, pm=args.pm, best_of_n=args.best_of_n, replicas=args.replicas,
                            api_key=args.api_key, ood=args.ood, ood_refuse=args.ood_refuse,
                            cpus_per_replica=g.cpus_per_worker, kv_cache_gib=g.kv_cache_gib,
                            default_max_tokens=g.max_new_tokens, pm_max_len=cfg.model.max_seq_len, seed=cfg.seed,
                            conversation_format=cfg.model.conversation_format, **limits),
                       host=args.host, port=args.port)



def run_policy_init(cfg: Config, run_dir: Path, args) -> int:
    from learners.distill_learner import train_policy_init

    out = train_policy_init(cfg, run_dir, args.stage, resume=args.resume)
    print(f"policy written to {out} (use it as --model.policy for train-ppo)")
    return 0


def run_collect(cfg: Config, run_dir: Path, args) -> int:
    from serve.collect import run_collect_forever

    c, g = cfg.collect, cfg.generation
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_collect_forever(dict(policy=args.policy, policy_b=args.policy_b, round=args.round,
                                    db=c.db or str(run_dir / "comparisons.sqlite"), api_key=args.api_key,
                                    max_text_chars=c.max_text_chars, max_turns=c.max_turns,
                                    max_request_bytes=c.max_request_bytes, max_new_tokens=g.max_new_tokens,
                                    temperature=g.temperature, cpus_per_replica=g.cpus_per_worker,
                                    kv_cache_gib=g.kv_cache_gib, seed=cfg.seed,
                                    conversation_format=cfg.model.conversation_format),
                               host=c.host, port=c.port)


def run_online(cfg: Config, run_dir: Path, args) -> int:
    from hh_ray.orchestration.online import online

    rounds = online(cfg, run_dir, resume=args.resume)
    print(f"{len(rounds)} round(s) done; per-round metrics in {run_dir}/round-*/summary.json and metrics.jsonl")
    return 0


STAGE_RUNNERS = {
    "demo": run_demo,
    "train-pm": run_train_pm,
    "eval": run_eval,
    "train-ppo": run_train_ppo,
    "serve": run_serve,
    "distill": run_policy_init,
    "sft": run_policy_init,
    "collect": run_collect,
    "online": run_online,
}

if __name__ == "__main__":
    sys.exit(main())
