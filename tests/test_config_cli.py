"""Configs from YAML and overrides; the CLI's help lists every option with its default."""

import subprocess
import sys

import pytest

from hh_ray.orchestration.cli import STAGES, build_parser, main
from hh_ray.config import Config, ConfigError, flat_fields, load_config, save_config
from tests.conftest import ROOT


def test_paper_defaults():
    c = Config()
    assert (c.ppo.kl_coef, c.ppo.clip_eps, c.ppo.gamma, c.ppo.entropy_coef, c.generation.max_new_tokens) == \
        (0.001, 0.2, 1.0, 0.0, 128)
    assert c.pm.epochs == 1 and c.pm.lr == pytest.approx(c.pm.pmp_lr / 10)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  kl_coef: 0.05\n  epochs: 2\nmodel:\n  gradient_checkpointing: true\n")
    c = load_config(f, {"ppo.epochs": "4", "seed": "7"})
    assert (c.ppo.kl_coef, c.ppo.epochs, c.seed, c.model.gradient_checkpointing) == (0.05, 4, 7, "full")
    save_config(c, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == c
    # gradient_checkpointing was a bool: false still means none; the default is selective
    assert load_config(None, {"model.gradient_checkpointing": "false"}).model.gradient_checkpointing == "none"
    assert load_config().model.gradient_checkpointing == "selective"
    with pytest.raises(ConfigError, match="'some' is not one of 'none', 'selective', 'full'"):
        load_config(None, {"model.gradient_checkpointing": "some"})


@pytest.mark.parametrize("yaml_text,msg", [
    ("ppo:\n  kl_cof: 1\n", "unknown config key 'ppo.kl_cof'"),
    ("ppo:\n  epochs: two\n", "ppo.epochs: expected int"),
    ("- a\n", "mapping"),
])
def test_bad_config_names_file_and_field(tmp_path, yaml_text, msg):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError, match=msg) as e:
        load_config(f)
    assert "bad.yaml" in str(e.value)


def test_shipped_configs_load():
    for name in ("tiny", "demo", "gpu-1node", "multinode", "online-tiny", "robustness"):
        load_config(ROOT / "configs" / f"{name}.yaml")


def test_robustness_preset_has_the_papers_robustness_settings():
    """configs/robustness.yaml: 2 PPO epochs, 32-token responses and a linear LR warm-up (§4.2),
    otherwise the paper's PPO defaults; long enough, and checkpointed often enough, to draw curves."""
    c = load_config(ROOT / "configs" / "robustness.yaml")
    assert (c.ppo.epochs, c.generation.max_new_tokens) == (2, 32)
    assert c.ppo.lr_schedule == "constant" and 0 < c.ppo.warmup_iterations < c.ppo.iterations
    # the learner's LR multiplier: linear up over the warm-up, then constant
    from hh_ray.ppo import lr_factor

    w = c.ppo.warmup_iterations
    factors = [lr_factor(i, c.ppo.iterations, c.ppo.lr_schedule, w) for i in range(c.ppo.iterations)]
    assert factors[:w] == pytest.approx([(i + 1) / w for i in range(w)]) and set(factors[w:]) == {1.0}
    assert (c.ppo.kl_coef, c.ppo.clip_eps, c.ppo.gamma, c.ppo.entropy_coef) == (0.001, 0.2, 1.0, 0.0)
    assert c.ppo.iterations >= 40 and c.ppo.iterations // c.ppo.checkpoint_every >= 4


def test_every_stage_has_help_with_defaults():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "stage")
    assert set(sub.choices) == set(STAGES)
    text = sub.choices["train-ppo"].format_help()
    for name in flat_fields():
        assert f"--{name}" in text
    assert "[0.001]" in text  # kl_coef's default is printed


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "hh_ray.orchestration.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "train-ppo" in out.stdout


def test_cli_reports_config_errors(capsys):
    assert main(["train-ppo", "--ppo.epochs", "x"]) == 2
    assert "ppo.epochs: expected int" in capsys.readouterr().err


@pytest.mark.parametrize("args,msg", [
    (["--ppo.klcoef", "0.1"], "command line: unknown config key 'ppo.klcoef' (did you mean ppo.kl_coef?)"),
    (["--ppo.mode", "fast"], "ppo.mode: 'fast' is not one of 'sync', 'async'"),
    (["--ppo.gamma", "1.5"], "ppo.gamma: 1.5 is out of range; allowed: in [0.0, 1.0]"),
    (["--ppo.epochs", "0"], "ppo.epochs: 0 is out of range; allowed: >= 1"),
    (["--config", "nope.yaml"], "config file not found: nope.yaml"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, msg):
    run_dir = tmp_path / "run"
    assert main(["train-ppo", "--run-dir", str(run_dir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err
    assert not run_dir.exists()


def test_yaml_type_error_names_file_and_key(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("generation:\n  temperature: [1, 2]\n")
    assert main(["train-pm", "--config", str(f), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{f}: generation.temperature: expected float" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,msg", [
    ({"pm.batch_size": 30, "pm.num_workers": 2, "pm.grad_accum": 2},
     "pm.batch_size=30 must be a multiple of pm.num_workers × pm.grad_accum = 4"),
    ({"sft.batch_size": 10, "sft.num_workers": 4}, "sft.batch_size=10 must be a multiple of"),
    ({"distill.grad_accum": 3}, "distill.batch_size=16 must be a multiple of"),
    ({"ppo.num_learners": 3}, "must both divide by ppo.num_learners (3)"),
    ({"ppo.rollout_batch_size": 24, "ppo.minibatch_size": 16}, "ppo.rollout_batch_size (24) must divide by "
                                                               "ppo.minibatch_size (16)"),
    ({"generation.max_new_tokens": 128, "model.max_seq_len": 128}, "generation.max_new_tokens (128) leaves no room"),
])
def test_rules_between_fields_are_checked_as_the_config_loads(tmp_path, overrides, msg):
    from hh_ray.config import validate

    validate(Config())  # the defaults keep every rule
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)
    # from a file, the message says which one (the culprit may be in either)
    f = tmp_path / "c.yaml"
    f.write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="c.yaml with overrides: "):
        load_config(f, overrides)


def test_cli_reports_a_rule_between_fields_in_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train-pm", "--run-dir", str(run_dir), "--pm.num_workers", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pm.batch_size=16 must be a multiple of pm.num_workers × pm.grad_accum = 3" in err and "\n" not in err
    assert not run_dir.exists()


def test_resume_mismatches_lists_each_differing_field_with_both_values():
    from hh_ray.config import RESUME_FIELDS, resume_mismatches

    saved = Config()
    assert resume_mismatches(saved, Config()) == []
    new = load_config(None, {"seed": 3, "model.pm": "/pm", "data.source": "x.jsonl", "data.eval_fraction": 0.2,
                             "ppo.rollout_batch_size": 32, "ppo.minibatch_size": 8,
                             # none of these moves a checkpoint's position: free to change
                             "ppo.lr": 0.1, "ppo.iterations": 99, "ppo.micro_batch_size": 2, "ppo.num_learners": 2,
                             "pm.batch_size": 32})
    assert resume_mismatches(saved, new, "ppo") == [
        "seed: 0 (run) vs 3 (now)", "model.pm: '' (run) vs '/pm' (now)",
        "data.source: 'synthetic' (run) vs 'x.jsonl' (now)", "data.eval_fraction: 0.1 (run) vs 0.2 (now)",
        "ppo.rollout_batch_size: 64 (run) vs 32 (now)", "ppo.minibatch_size: 16 (run) vs 8 (now)"]
    assert resume_mismatches(saved, new, "pm") == [
        "seed: 0 (run) vs 3 (now)", "model.pm: '' (run) vs '/pm' (now)",
        "data.source: 'synthetic' (run) vs 'x.jsonl' (now)", "data.eval_fraction: 0.1 (run) vs 0.2 (now)",
        "pm.batch_size: 16 (run) vs 32 (now)"]
    assert resume_mismatches(saved, new, "sft") == resume_mismatches(saved, new, "distill") == [
        "seed: 0 (run) vs 3 (now)", "data.source: 'synthetic' (run) vs 'x.jsonl' (now)",
        "data.eval_fraction: 0.1 (run) vs 0.2 (now)"]  # no PM in these stages
    fields = set(flat_fields())
    for section, keys in RESUME_FIELDS.items():  # every name is a real field (or section)
        assert all(k in fields or (k.endswith(".*") and any(f.startswith(k[:-1]) for f in fields)) for k in keys)


def test_keep_checkpoints_defaults_and_the_resume_flags_are_documented():
    c = Config()
    assert c.ppo.keep_checkpoints == c.pm.keep_checkpoints == c.distill.keep_checkpoints == c.sft.keep_checkpoints == 3
    with pytest.raises(ConfigError, match="ppo.keep_checkpoints: -1 is out of range"):
        load_config(None, {"ppo.keep_checkpoints": -1})
    sub = next(a for a in build_parser()._actions if a.dest == "stage")
    for stage in ("train-ppo", "train-pm", "distill", "sft"):
        text = " ".join(sub.choices[stage].format_help().split())
        assert "--allow-config-change" in text and "seed, batch sizes, models or data" in text
        assert "--resume" in text and "newest checkpoint that verifies" in text
