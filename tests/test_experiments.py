"""experiments/run.py's publishing step: figures copied beside results.json and named there, the
run-only keys (leading "_") left out, and one HTML page per experiment section."""

import importlib.util
import json

from tests.conftest import ROOT


def load_runner():
    spec = importlib.util.spec_from_file_location("experiments_run", ROOT / "experiments" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_publish_copies_figures_and_drops_run_only_keys(tmp_path):
    runner = load_runner()
    fig = tmp_path / "run" / "plot.png"
    fig.parent.mkdir()
    fig.write_bytes(b"\x89PNG\r\n\x1a\n")
    results = {"command": "python experiments/run.py", "commit": "abc1234", "processor": "cpu",
               "experiments": {"elo": {"method": "judge <PM>", "num_prompts": 64, "_ppo": "/somewhere",
                                       "figures": {"elo": str(fig), "missing": str(tmp_path / "nope.png")}}}}
    runner.publish(results, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    elo = saved["experiments"]["elo"]
    assert "_ppo" not in elo and elo["figures"] == {"elo": "elo-elo.png"}
    assert (tmp_path / "out" / "elo-elo.png").read_bytes() == fig.read_bytes()
    page = (tmp_path / "out" / "report.html").read_text()
    assert 'id="elo"' in page and "judge &lt;PM&gt;" in page and 'src="elo-elo.png"' in page
