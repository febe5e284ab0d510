"""Fuzz the two parsers users feed by hand: the config loader and the HH
transcript parser. Any input either parses or raises the documented error
(ConfigError / DataError, which name the file, line or field); nothing else."""

import json

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hh_ray.config import ConfigError, flat_fields, load_config
from hh_ray.data import DataError, comparisons_from_records, read_jsonl, split_pair

KEYS = sorted(flat_fields())
TRIED = {"config": 0, "hh": 0}
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(), max_size=3))
# Real keys, near-misses of real keys, and junk; nested as YAML would nest them.
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k[:-1]), st.text(max_size=10))


def nest(flat: dict) -> dict:
    out: dict = {}
    for dotted, v in flat.items():
        *parents, leaf = dotted.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {}) if isinstance(d.get(p, {}), dict) else {}
        d[leaf] = v
    return out


@FAST
@given(st.dictionaries(keys, scalars, max_size=5))
def test_config_loader_only_raises_config_errors(tmp_path_factory, flat):
    TRIED["config"] += 1
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(yaml.safe_dump(nest(flat)))
    try:
        load_config(path)
    except ConfigError as e:
        assert "fuzz.yaml" in str(e) and "\n" not in str(e).strip()


@FAST
@given(st.text(max_size=200))
def test_config_loader_on_arbitrary_text(tmp_path_factory, text):
    TRIED["config"] += 1
    path = tmp_path_factory.getbasetemp() / "fuzz-text.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as e:
        assert "fuzz-text.yaml" in str(e)


turn = st.tuples(st.sampled_from(["\n\nHuman: ", "\n\nAssistant: ", "\n\nHuman:", "", "Assistant:"]),
                 st.text(max_size=30)).map("".join)
transcripts = st.lists(turn, max_size=5).map("".join)


@FAST
@given(transcripts, transcripts)
def test_hh_pair_parser_only_raises_data_errors(chosen, rejected):
    TRIED["hh"] += 1
    try:
        c = split_pair(chosen, rejected)
    except DataError:
        return
    # What parses reassembles exactly into the two transcripts.
    assert c.prompt + c.chosen == chosen and c.prompt + c.rejected == rejected


@FAST
@given(st.lists(st.one_of(st.dictionaries(st.sampled_from(["chosen", "rejected", "x"]),
                                          st.one_of(transcripts, st.integers(), st.none()), max_size=3),
                          st.integers(), st.text(max_size=10)), max_size=4))
def test_hh_jsonl_reader_names_the_line(tmp_path_factory, records):
    TRIED["hh"] += 1
    path = tmp_path_factory.getbasetemp() / "fuzz.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    try:
        list(comparisons_from_records(read_jsonl(path), where=str(path)))
    except DataError as e:
        assert "fuzz.jsonl:" in str(e)


def test_zz_report_how_many_inputs_were_tried():
    print(f"fuzz inputs tried: config loader {TRIED['config']}, HH parser {TRIED['hh']}")
    assert TRIED["config"] >= 300 and TRIED["hh"] >= 300
