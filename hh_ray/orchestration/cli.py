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
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's and vLLM's own log lines on the console; without it they stay in the "
                        "cluster's log files (linked as RUN_DIR/ray-logs), and the console shows hh-ray's "
                        "progress and results")
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
    g.add_argument("--best-of", type=int, default=0,
                   help="elo: also rate the best of N samples of the first policy (0: no such player)")
    g.add_argument("--best-of-pm", help="elo: PM that picks the best of N (default: the judge, --pm)")
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
    g.add_argument("--min-move", type=float, default=0.1,
                   help="robustness: a rise of the train-PM gain and a fall of the test-PM gain count only "
                        "beyond this (PM units), so that sampling noise between checkpoints does not")


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

    # Absolute, as every Ray worker that writes into it must see the same folder as the driver.
    run_dir = (Path(args.run_dir) if args.run_dir else default_run_dir(args.stage)).resolve()
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


# ---------------------------------------------------------------- Ctrl-C and SIGTERM

STOP_DEADLINE_S = 8.0  # first signal -> hard stop: the clean-up's share of the 10 s promise
RESUMABLE = {"demo", "train-pm", "distill", "sft", "train-ppo", "online"}


def _run_processes() -> list:
    """Every process descending from this one, as psutil handles (a reused pid is never hit)."""
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _is_alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_processes(procs: list, wait_s: float = 1.0, rescan: bool = True) -> list:
    """SIGKILL `procs` and (`rescan`) whatever descends from this process now (a worker Ray
    started meanwhile); returns those still alive after `wait_s`."""
    import time

    import psutil

    seen = {p.pid: p for p in procs}
    for _ in range(2 if rescan else 1):  # again for processes started while the first round was killed
        if rescan:
            seen.update({p.pid: p for p in _run_processes()})
        for p in seen.values():
            try:
                p.kill()
            except psutil.Error:
                pass
    deadline = time.monotonic() + wait_s
    while True:
        psutil.wait_procs(_direct_children(seen.values()), timeout=0)  # reap our own: no zombies
        alive = [p for p in seen.values() if _is_alive(p)]  # a zombie elsewhere counts as gone
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _direct_children(procs) -> list:
    import os

    import psutil

    out = []
    for p in procs:
        try:
            if p.ppid() == os.getpid():
                out.append(p)
        except psutil.Error:
            pass
    return out


class Interrupts:
    """SIGINT and SIGTERM end every stage the same way, within 10 s.

    The first signal prints one line and raises KeyboardInterrupt in the main thread
    (SIGTERM too): the current step is abandoned, the stage's own clean-ups run (actors
    killed; a learner group waits for Ray Train only briefly), then `main` kills the
    processes of a cluster started here (GCS, raylet, agents, workers: see
    hh_ray.orchestration.cluster.leave_ray_now for why not `ray.shutdown()`), W&B's exit hook
    finishes its run, and the last exit hook kills whatever is left of the processes
    recorded at the signal and exits without the interpreter's slow teardown. A watcher thread, woken through
    `signal.set_wakeup_fd` (so also under a handler a library installed, as Serve does),
    stops the process hard if that has not finished STOP_DEADLINE_S after the signal, or at
    once on a second signal: it SIGKILLs every process descending from this one (recorded at
    the first signal; on a cluster started here that is all of Ray's: GCS, raylet, agents,
    actors, learners) and exits. On a cluster the driver only joined, Ray ends the job's
    actors when the driver exits. Exit status 128 + the signal: 130 for SIGINT, 143 for SIGTERM.

    No checkpoint is left half-written: they are written into a temporary folder and renamed
    into place, so an abandoned save leaves a leftover the next start removes, and `--resume`
    continues from the last complete one."""

    def __init__(self, stage: str):
        import atexit
        import os
        import signal
        import threading

        self.stage, self.signum, self.raised, self.code = stage, None, False, None
        self.processes, self.ray_processes = [], []  # recorded at the first signal
        self._saved = None
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach only the main thread: leave them alone (main() called from a thread)
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._saved = (signal.set_wakeup_fd(self._write, warn_on_full_buffer=False),
                       signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
        self.install()
        threading.Thread(target=self._watch, daemon=True, name="hh-ray-interrupts").start()
        # Registered before Ray's and W&B's exit hooks, so it runs after them.
        atexit.register(self._at_exit)

    def install(self) -> None:
        """(Re)install the handlers: ray.init sets its own SIGTERM handler (an unbounded exit)."""
        import signal

        if self._saved is not None:
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Main thread. Later signals are the watcher's: they stop the process at once.
        if not self.raised:
            self.raised = True
            self.signum = self.signum or signum
            raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        import signal

        return 128 + (self.signum or signal.SIGINT)

    def _say(self, text: str, newline: bool = False) -> None:
        import os

        try:  # unbuffered and lock-free: safe from any thread; `newline`: off a progress bar's line
            os.write(2, f"{chr(10) if newline else ''}hh-ray {self.stage}: {text}\n".encode())
        except OSError:
            pass

    def _watch(self) -> None:
        import os
        import signal
        import threading

        seen = 0
        while True:
            try:
                data = os.read(self._read, 64)
            except OSError:
                return
            if not data:  # main() returned without a signal and closed the pipe
                os.close(self._read)
                return
            for b in data:
                if b not in (signal.SIGINT, signal.SIGTERM):
                    continue
                seen += 1
                if seen == 1:
                    self.signum = self.signum or b
                    self.processes = _run_processes()
                    if "ray" in sys.modules:  # a Ray stage (for the others, importing it would cost seconds)
                        from hh_ray.orchestration.cluster import local_cluster_processes

                        self.ray_processes = local_cluster_processes()
                    resume = "; resume with --resume" if self.stage in RESUMABLE else ""
                    self._say(f"interrupted ({signal.Signals(b).name}): stopping{resume}", newline=True)
                    timer = threading.Timer(STOP_DEADLINE_S, self._hard_stop,
                                            (f"clean-up not done in {STOP_DEADLINE_S:.0f} s",))
                    timer.daemon = True
                    timer.start()
                else:
                    self._hard_stop(f"second signal ({signal.Signals(b).name})")

    def _hard_stop(self, why: str) -> None:
        import os

        left = _kill_processes(self.processes)
        self._say(f"{why}: killed the run's processes"
                  + (f" ({len(left)} still alive: {[p.pid for p in left]})" if left else "") + "; exiting")
        os._exit(self.exit_code)

    def stopped(self) -> int:
        """The interrupt reached main(): kill the local cluster's processes (all of Ray's,
        those recorded at the signal too: a process whose parent died meanwhile is no longer
        below the raylet) and return the exit status; the exit hook ends the rest (W&B's
        service, once W&B's own hook has finished the run)."""
        if "ray" in sys.modules:
            from hh_ray.orchestration.cluster import leave_ray_now, local_cluster_processes

            try:
                leave_ray_now()
                _kill_processes(local_cluster_processes() + self.ray_processes, wait_s=2.0, rescan=False)
            except Exception as e:  # the exit hook and the watcher still end the processes
                self._say(f"stopping Ray: {e!r}")
        return self.exit_code

    def _at_exit(self) -> None:
        # The last exit hook (W&B's, which finishes the run and ends its service, and Ray's run
        # before it). After a signal: kill what is left of the processes recorded then (e.g. a
        # worker's child whose parent is gone) and of this one's descendants, and skip the
        # interpreter's teardown of every module (seconds, with torch and vLLM loaded).
        import os

        if self.signum is None:
            return
        _kill_processes(self.processes)  # and every descendant now (the watcher may not have recorded them yet)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(1 if self.code is None else self.code)

    def done(self, code: int | None) -> None:
        """main() is returning `code` (None: with an exception). No signal came: put back the
        handlers and wakeup fd it found (tests call main in-process). After a signal: the exit
        hook ends the process with `code`."""
        import atexit
        import os
        import signal

        self.code = code
        if self._saved is None or self.signum is not None:
            return
        old_fd, old_int, old_term = self._saved
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        os.close(self._write)  # ends the watcher
        atexit.unregister(self._at_exit)
        self._saved = None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    interrupts = Interrupts(args.stage)  # SIGINT/SIGTERM: the stage ends within 10 s (exit 130/143)
    code = None
    try:
        code = _run_stage(parser, args, unknown, interrupts)
    except BaseException as e:
        if interrupts.signum is None:
            raise
        if not isinstance(e, KeyboardInterrupt):  # a clean-up that failed while the stage unwound
            print(f"hh-ray {args.stage}: while stopping: {e!r}", file=sys.stderr)
        code = interrupts.stopped()
    finally:
        interrupts.done(code)
    return code


def _run_stage(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str],
               interrupts: Interrupts) -> int:
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
            from hh_ray.orchestration.cluster import ensure_ray, link_logs

            ensure_ray(quiet=not args.verbose)
            interrupts.install()  # ray.init replaced the SIGTERM handler
            logs = link_logs(run_dir)
            if logs and not args.verbose:
                print(f"Ray and vLLM logs: {logs} (--verbose shows them here)", flush=True)
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
                            cpus_per_replica=g.cpus_per_worker, gpus_per_replica=g.num_gpus, kv_cache_gib=g.kv_cache_gib,
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
                                    temperature=g.temperature, cpus_per_replica=g.cpus_per_worker, gpus_per_replica=g.num_gpus,
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
