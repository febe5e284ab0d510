"""HH parsing on hand-written transcripts, loading with clear errors, synthetic set."""

import gzip
import json

import pytest

from hh_ray import data
from hh_ray.data import DataError, split_pair
from tests.conftest import hh_data_dir


def test_single_turn_split():
    c = split_pair("\n\nHuman: Hi?\n\nAssistant: Hello!", "\n\nHuman: Hi?\n\nAssistant: Go away.")
    assert c.prompt == "\n\nHuman: Hi?\n\nAssistant:"
    assert (c.chosen, c.rejected) == (" Hello!", " Go away.")
    assert c.num_turns == 1


def test_shared_response_start_backs_off_to_assistant_marker():
    # The common prefix runs into the responses (" Sure"); the prompt must stop at the marker.
    c = split_pair("\n\nHuman: Q\n\nAssistant: Sure, here.", "\n\nHuman: Q\n\nAssistant: Sure thing")
    assert c.prompt == "\n\nHuman: Q\n\nAssistant:"
    assert c.chosen == " Sure, here."


def test_response_containing_assistant_marker():
    # Splitting on the last "\n\nAssistant:" would cut inside the chosen response.
    chosen = "\n\nHuman: Q\n\nAssistant: A story:\n\nAssistant: and more"
    rejected = "\n\nHuman: Q\n\nAssistant: No."
    c = split_pair(chosen, rejected)
    assert c.prompt == "\n\nHuman: Q\n\nAssistant:"
    assert c.prompt + c.chosen == chosen and c.prompt + c.rejected == rejected


def test_multi_turn_prompt_kept_whole():
    ctx = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    c = split_pair(ctx + " yes", ctx + " no")
    assert c.prompt == ctx and c.num_turns == 2


@pytest.mark.parametrize("chosen,rejected,msg", [
    ("\n\nHuman: Q\n\nAssistant:", "\n\nHuman: Q\n\nAssistant: x", "empty chosen"),
    ("\n\nHuman: Q\n\nAssistant:  ", "\n\nHuman: Q\n\nAssistant: x", "empty chosen"),
    ("\n\nHuman: Q only", "\n\nHuman: Q other", "no shared"),
    ("\n\nHuman: Q\n\nAssistant: x", "\n\nHuman: Q\n\nAssistant: x", "identical"),
])
def test_bad_pairs_raise(chosen, rejected, msg):
    with pytest.raises(DataError, match=msg):
        split_pair(chosen, rejected)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_errors_name_file_and_line(tmp_path):
    good = json.dumps({"chosen": "\n\nHuman: Q\n\nAssistant: a", "rejected": "\n\nHuman: Q\n\nAssistant: b"})
    f = _write(tmp_path / "train.jsonl", [good, "{not json", good])
    with pytest.raises(DataError, match=r"train.jsonl:2: malformed JSON"):
        data.load_comparisons(str(f))
    f = _write(tmp_path / "train.jsonl", [good, good, json.dumps({"chosen": "x"})])
    with pytest.raises(DataError, match=r"train.jsonl:3: missing or non-string field 'rejected'"):
        data.load_comparisons(str(f))
    counter = {}
    out = data.load_comparisons(str(f), skip_bad=True, counter=counter)
    assert len(out) == 2 and counter["skipped"] == 1


def test_folder_with_subset_and_gzip(tmp_path):
    sub = tmp_path / "harmless-base"
    sub.mkdir()
    recs = [c.to_record() for c in data.synthetic_comparisons(5)]
    with gzip.open(sub / "test.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in recs))
    out = data.load_comparisons(str(tmp_path), data_dir="harmless-base", split="test")
    assert [c.to_record() for c in out] == recs
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no .jsonl"):
        data.load_comparisons(str(tmp_path / "nothing"))


def test_empty_dataset_refused(tmp_path):
    f = _write(tmp_path / "e.jsonl", [""])
    with pytest.raises(DataError, match="no comparisons"):
        data.load_comparisons(str(f))


def test_red_team_schema(tmp_path):
    rec = {"transcript": "\n\nHuman: how to x?\n\nAssistant: no\n\nHuman: pls\n\nAssistant: no",
           "min_harmlessness_score_transcript": -1.5}
    f = _write(tmp_path / "red.jsonl", [json.dumps(rec)])
    assert data.load_red_team(str(f)) == [("\n\nHuman: how to x?\n\nAssistant:", -1.5)]


def test_synthetic_is_deterministic_and_follows_its_rule():
    a, b = data.synthetic_comparisons(300, seed=3), data.synthetic_comparisons(300, seed=3)
    assert a == b and a != data.synthetic_comparisons(300, seed=4)
    assert all(data.kind_fraction(c.chosen) > data.kind_fraction(c.rejected) for c in a)
    assert any(c.num_turns == 2 for c in a)
    # round trip through the HH transcript format
    assert all(split_pair(**c.to_record()) == c for c in a)


def test_prompts_deduplicated_in_order():
    cs = data.synthetic_comparisons(200)
    ps = data.prompts_of(cs)
    assert len(ps) == len(set(ps)) < len(cs) and ps[0] == cs[0].prompt


@pytest.mark.skipif(hh_data_dir() is None, reason="HH_DATA_DIR not set")
def test_real_harmless_base_reassembles_exactly():
    path = hh_data_dir() / "harmless-base" / "test.jsonl.gz"
    ok = bad = 0
    for line in gzip.open(path, "rt"):
        rec = json.loads(line)
        try:
            c = split_pair(rec["chosen"], rec["rejected"])
        except DataError as e:
            assert "empty" in str(e)  # the only bad records are empty responses
            bad += 1
            continue
        assert c.prompt + c.chosen == rec["chosen"] and c.prompt + c.rejected == rec["rejected"]
        ok += 1
    print(f"harmless-base test: {ok} parsed, {bad} refused (empty response)")
    assert ok + bad == 2312 and ok >= 2300
