"""The layering rule, read from the source (docs/architecture.md, "Layers"):

- the core (modules directly in hh_ray/) imports none of ray, vllm, actors,
  learners, serve or hh_ray.orchestration, anywhere in the file (function-local
  imports too), so it runs and tests without a cluster;
- actors/, learners/ and serve/ build on the core and never on the
  orchestration layer; learners/ never import actors/ (the weight codec is core);
- the orchestration layer imports what it wires together at module top, so the
  package graph is visible; only the CLI dispatches lazily, to keep `--help` fast.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RAY_SIDE = ("ray", "vllm", "actors", "learners", "serve")


def imports(path: Path, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) of every import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = []
    for n in nodes:
        if isinstance(n, ast.Import):
            out += [(n.lineno, a.name) for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.level == 0:
            out.append((n.lineno, n.module or ""))
    return out


def violations(files, forbidden, top_level_only: bool = False) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{line} imports {m}" for p in files for line, m in imports(p, top_level_only)
            if any(m == f or m.startswith(f + ".") for f in forbidden)]


def core_modules() -> list[Path]:
    return sorted((ROOT / "hh_ray").glob("*.py"))


def test_core_imports_nothing_of_ray_or_the_layers_above():
    bad = violations(core_modules(), RAY_SIDE + ("hh_ray.orchestration",))
    print(f"\n{len(core_modules())} core modules, {len(bad)} forbidden imports")
    assert not bad, "\n".join(bad)


def test_actors_learners_serve_build_on_the_core_only():
    files = [p for d in ("actors", "learners", "serve") for p in sorted((ROOT / d).glob("*.py"))]
    bad = violations(files, ("hh_ray.orchestration",))
    bad += violations(sorted((ROOT / "learners").glob("*.py")), ("actors", "serve"))
    assert not bad, "\n".join(bad)


def test_orchestration_imports_what_it_wires_at_module_top():
    files = [p for p in sorted((ROOT / "hh_ray" / "orchestration").glob("*.py")) if p.name != "cli.py"]
    lazy = [f"{p.relative_to(ROOT)}:{line} imports {m} inside a function"
            for p in files for line, m in set(imports(p)) - set(imports(p, top_level_only=True))
            if any(m == f or m.startswith(f + ".") for f in RAY_SIDE + ("hh_ray.orchestration",))]
    assert not lazy, "\n".join(sorted(lazy))


def test_the_rule_catches_a_function_local_import(tmp_path):
    """The check reads imports at any depth, so a lazy import cannot hide."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import ray.train\n    from actors.generation import GenerationPool\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert violations([f], RAY_SIDE) == ["m.py:2 imports ray.train", "m.py:3 imports actors.generation"]
    finally:
        ROOT = saved
