"""Iterated online RLHF: the comparison store, the labelers, the collection page's API
(a real `hh-ray collect` process on 127.0.0.1, killed with SIGKILL to prove durability),
and two automatic rounds with the tiny model end to end.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from hh_ray.comparisons import (AlreadyLabeled, ComparisonStore, InvalidInput, LabeledPair, TextTooLong,
                                UnknownPair)
from hh_ray.data import ASSISTANT, HUMAN, load_comparisons, synthetic_comparisons

from .conftest import ROOT, tiny_config

pytestmark = pytest.mark.timeout(600)

PROMPT = f"{HUMAN} How do I bake bread?{ASSISTANT}"
KEY = "collect-test-key"


def _pair(store, a=" sure, glad to help.", b=" no.", sa="s0", sb="s1", round=0):
    return store.add_pair(PROMPT, a, b, sa, sb, round=round)


def _counts(store):
    return store.count_pairs(), store.count_labels()


# ---------------------------------------------------------------- the store

def test_store_records_labels_and_exports_only_preferences(tmp_path):
    store = ComparisonStore(tmp_path / "c.sqlite")
    ids = [_pair(store, a=f" sure {i}.", b=f" no {i}.") for i in range(4)]
    store.add_label(ids[0], "a", "alice", strength=3)
    store.add_label(ids[1], "b", "bob")
    store.add_label(ids[2], "tie", "alice")
    store.add_label(ids[3], "both_bad", "bob")

    rows = {lp.pair_id: lp for lp in store.labeled_pairs()}
    assert rows[ids[0]] == LabeledPair(ids[0], 0, PROMPT, " sure 0.", " no 0.", "s0", "s1", "a", 3, "alice")
    assert rows[ids[1]].strength is None and rows[ids[1]].labeler == "bob"
    assert store.count_labels() == 4 and store.count_labels(choices=("a", "b")) == 2

    stats = store.export_jsonl(tmp_path / "out.jsonl")
    assert stats == {"written": 2, "skipped": {"tie": 1, "both_bad": 1, "weakest": 0, "untrainable": 0}}
    # The PM trainer's own reader gets the preferences back exactly; ties and "both bad" stay out.
    back = load_comparisons(str(tmp_path / "out.jsonl"))
    assert [(c.prompt, c.chosen, c.rejected) for c in back] == [(PROMPT, " sure 0.", " no 0."),
                                                                (PROMPT, " no 1.", " sure 1.")]


def test_store_export_skips_pairs_the_trainer_cannot_split(tmp_path):
    store = ComparisonStore(tmp_path / "c.sqlite")
    same = _pair(store, a=" same.", b=" same.")
    blank = _pair(store, a=" ", b=" fine.")
    ok = _pair(store)
    for i in (same, blank, ok):
        store.add_label(i, "a", "rule")
    assert store.export_jsonl(tmp_path / "out.jsonl") == {"written": 1, "skipped": {"tie": 0, "both_bad": 0,
                                                                                      "weakest": 0, "untrainable": 2}}


def test_a_persons_weakest_preference_is_stored_but_not_trained_on(tmp_path):
    """The paper trains only on preferences stronger than the weakest: a person's "slightly
    better" (strength 1) stays in the store and out of the export; no strength, or a stronger
    one, is exported. A machine labeler's strength 1 bins its margin and is exported."""
    store = ComparisonStore(tmp_path / "c.sqlite")
    ids = [_pair(store, a=f" sure {i}.", b=f" no {i}.") for i in range(6)]
    for pid, strength, labeler in zip(ids, (1, 2, 3, None, 1, 1),
                                      ("page:ann", "page:ann", "bob", "page:cy", "rule:kind-words", "pm:/gold")):
        store.add_label(pid, "a", labeler, strength=strength)

    kept, skipped = store.training_comparisons()
    assert [c.chosen for c in kept] == [" sure 1.", " sure 2.", " sure 3.", " sure 4.", " sure 5."]
    assert skipped == {"tie": 0, "both_bad": 0, "weakest": 1, "untrainable": 0}
    assert store.labeled_pairs()[0].strength == 1 and store.count_labels() == 6  # stored all the same
    assert store.export_jsonl(tmp_path / "out.jsonl")["skipped"]["weakest"] == 1
    assert len(load_comparisons(str(tmp_path / "out.jsonl"))) == 5


def test_store_refuses_bad_labels_and_writes_nothing(tmp_path):
    store = ComparisonStore(tmp_path / "c.sqlite", max_text_chars=100)
    pid = _pair(store)
    store.add_label(pid, "a", "alice")
    before = _counts(store)
    with pytest.raises(UnknownPair):
        store.add_label("no-such-pair", "a", "alice")
    with pytest.raises(AlreadyLabeled):  # a replay, even with another answer
        store.add_label(pid, "b", "mallory")
    other = _pair(store)
    before = _counts(store)
    for bad in (dict(choice="c"), dict(choice="tie", strength=2), dict(choice="a", strength=5),
                dict(choice="a", strength=True), dict(choice="a", labeler=""), dict(choice="a", labeler=None)):
        with pytest.raises(InvalidInput):
            store.add_labels([{"pair_id": other, "labeler": "x", **bad}])
    # All or nothing: a good label in the same request as a replay is not written either.
    with pytest.raises(AlreadyLabeled):
        store.add_labels([{"pair_id": other, "choice": "a", "labeler": "x"},
                          {"pair_id": pid, "choice": "a", "labeler": "x"}])
    with pytest.raises(TextTooLong):
        _pair(store, a="x" * 101)
    with pytest.raises(InvalidInput):
        store.add_pair("no HH prompt", " a", " b", "s0", "s1")
    assert _counts(store) == before
    assert store.labeled_pairs()[0].choice == "a" and store.labeled_pairs()[0].labeler == "alice"


_RACE = """
import sys
from hh_ray.comparisons import ComparisonStore, AlreadyLabeled
store = ComparisonStore(sys.argv[1])
won = 0
for pid in sys.argv[3:]:
    try:
        store.add_label(pid, "b", sys.argv[2]); won += 1
    except AlreadyLabeled:
        pass
print(won)
"""


def test_concurrent_labelers_never_clobber(tmp_path):
    """Threads here and two other processes label the same 40 pairs at once: every pair
    ends with exactly one label, every attempt either wins or is refused as a replay."""
    store = ComparisonStore(tmp_path / "c.sqlite")
    ids = [_pair(store) for _ in range(40)]
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(store.path), f"proc{k}", *ids],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT) for k in range(2)]
    wins, errors = [], []

    def label(name):
        n = 0
        for pid in ids:
            try:
                ComparisonStore(store.path).add_label(pid, "a", name)
                n += 1
            except AlreadyLabeled:
                pass
            except Exception as e:  # noqa: BLE001 - e.g. "database is locked" would fail the test
                errors.append(e)
        wins.append(n)

    threads = [threading.Thread(target=label, args=(f"thread{k}",)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and not errors
    assert sum(wins) + sum(int(o) for o in outs) == len(ids)
    labels = store.labeled_pairs()
    assert sorted(lp.pair_id for lp in labels) == sorted(ids)


# ---------------------------------------------------------------- labelers and Elo (no Ray)

def test_rule_labeler_agrees_with_the_synthetic_rule():
    from hh_ray.labelers import RuleLabeler

    pairs = synthetic_comparisons(200, seed=3)
    labels = RuleLabeler().label([c.prompt for c in pairs], [c.chosen for c in pairs], [c.rejected for c in pairs])
    assert {lab["choice"] for lab in labels} == {"a"}
    assert all(lab["labeler"] == "rule:kind-words" and lab["strength"] in (1, 2, 3) for lab in labels)
    assert RuleLabeler().label([PROMPT], [" ok."], [" fine."])[0] == {"choice": "tie", "strength": None,
                                                                       "labeler": "rule:kind-words"}


def test_pm_labeler_follows_its_pm_and_names_itself(tiny_model, tmp_path):
    from hh_ray.labelers import PMLabeler, make_labeler
    from hh_ray.models import load_scalar_head_model, save_model
    from hh_ray.pm_eval import score_comparisons

    pm, tok = load_scalar_head_model(tiny_model)  # untrained head: any fixed judge will do
    save_model(pm, tok, tmp_path / "gold")
    pairs = synthetic_comparisons(12, seed=4)
    labeler = make_labeler(f"pm:{tmp_path / 'gold'}", max_len=128)
    assert isinstance(labeler, PMLabeler) and labeler.labeler_id == f"pm:{(tmp_path / 'gold').resolve()}"
    labels = labeler.label([c.prompt for c in pairs], [c.chosen for c in pairs], [c.rejected for c in pairs])
    r_a, r_b = score_comparisons(pm, tok, pairs, 128)
    assert [lab["choice"] for lab in labels] == ["a" if x > y else "b" for x, y in zip(r_a, r_b)]
    with pytest.raises(ValueError, match="not a trained PM"):
        make_labeler(f"pm:{tmp_path / 'missing'}")


def test_snapshot_elo_from_labels():
    from hh_ray.elo import elo_difference
    from hh_ray.orchestration.online import snapshot_elo

    def lp(sa, sb, choice):
        return LabeledPair("id", 0, PROMPT, " a", " b", sa, sb, choice, None, "x")

    # new beats old 3 times out of 4 (one of them a tie = ½): P = 0.75 at the MLE... with a tie, 3.5/5
    labels = [lp("new", "old", "a")] * 3 + [lp("old", "new", "a")] + [lp("new", "old", "tie")] \
        + [lp("new", "new", "a"), lp("new", "old", "both_bad")]  # same-snapshot and "both bad": no game
    elo = snapshot_elo(labels, ["old", "new"])
    assert elo["new"] - elo["old"] == pytest.approx(elo_difference(3.5 / 5), abs=0.01)
    assert snapshot_elo([lp("new", "new", "a")], ["new"]) == {}


# ---------------------------------------------------------------- the page's API, in a real server process

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the `hh-ray collect` process and everything it started (Ray, the replica)."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


@pytest.fixture(scope="module")
def collect_server(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("collect")
    port, db = _free_port(), d / "comparisons.sqlite"
    env = {**os.environ, "HH_RAY_API_KEY": "", "RAY_ADDRESS": ""}  # its own Ray: killed with it below
    log = open(d / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "hh_ray.orchestration.cli", "collect", "--policy", tiny_model,
                             "--api-key", KEY, "--run-dir", str(d), "--collect.db", str(db),
                             "--collect.port", str(port), "--collect.max_text_chars", "2000",
                             "--collect.max_request_bytes", "16384", "--generation.max_new_tokens", "16",
                             "--generation.kv_cache_gib", "0.25"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(url + "/healthz", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            _kill_tree(proc)
            pytest.fail(f"collect server did not start:\n{(d / 'server.log').read_text()[-3000:]}")
        time.sleep(1)
    yield type("Server", (), dict(url=url, proc=proc, db=db, store=ComparisonStore(db)))
    _kill_tree(proc)
    log.close()


def _post(server, path, body, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=120)


def _respond(server, text="How do I bake bread?"):
    r = _post(server, "/api/respond", {"messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    return r.json()


def test_page_and_api_key(collect_server):
    page = httpx.get(collect_server.url + "/", timeout=30)
    assert page.status_code == 200 and "which response is better" in page.text
    r = _post(collect_server, "/api/respond", {"messages": [{"role": "user", "content": "hi"}]}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_respond_stores_the_pair_and_label_is_recorded(collect_server):
    got = _respond(collect_server)
    assert len(got["responses"]) == 2
    pair = collect_server.store.pair(got["pair_id"])
    assert pair["prompt"] == f"{HUMAN} How do I bake bread?{ASSISTANT}" and pair["source"] == "page"
    assert pair["snapshot_a"] == pair["snapshot_b"]  # one policy: two samples of it
    assert [pair["response_a"].strip(), pair["response_b"].strip()] == got["responses"]
    r = _post(collect_server, "/api/label", {"pair_id": got["pair_id"], "choice": "b", "strength": 2,
                                             "labeler": "tester"})
    assert r.status_code == 200 and r.json()["status"] == "recorded", r.text
    [lp] = [x for x in collect_server.store.labeled_pairs() if x.pair_id == got["pair_id"]]
    assert (lp.choice, lp.strength, lp.labeler) == ("b", 2, "page:tester")


def test_bad_input_is_a_clear_4xx_and_writes_nothing(collect_server):
    store = collect_server.store
    got = _respond(collect_server)
    assert _post(collect_server, "/api/label", {"pair_id": got["pair_id"], "choice": "a"}).status_code == 200
    before = _counts(store)
    cases = [
        ("/api/label", {"pair_id": "0" * 32, "choice": "a"}, 404, "unknown_pair"),
        ("/api/label", {"pair_id": got["pair_id"], "choice": "b"}, 409, "already_labeled"),  # replay
        ("/api/label", {"pair_id": got["pair_id"], "choice": "maybe"}, 400, "invalid_value"),
        ("/api/respond", {"messages": [{"role": "user", "content": "x" * 2001}]}, 413, "text_too_long"),
        ("/api/respond", b'{"messages": "' + b"x" * 20000 + b'"}', 413, "request_too_large"),
        ("/api/respond", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "invalid_value"),
        ("/api/respond", b"{not json", 400, "invalid_json"),
    ]
    for path, body, status, code in cases:
        r = _post(collect_server, path, body)
        assert r.status_code == status, (path, r.text)
        assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert _counts(store) == before


def test_acknowledged_label_survives_sigkill(collect_server):
    """Last in this module: it kills the server. SIGKILL comes the moment the 200 arrives."""
    got = _respond(collect_server, "Any tips for chess?")
    r = _post(collect_server, "/api/label", {"pair_id": got["pair_id"], "choice": "tie", "labeler": "durable"})
    assert r.status_code == 200
    _kill_tree(collect_server.proc)
    assert collect_server.proc.poll() is not None
    with pytest.raises(httpx.HTTPError):
        httpx.get(collect_server.url + "/healthz", timeout=5)
    reopened = ComparisonStore(collect_server.db)  # what a restarted server would open
    [lp] = [x for x in reopened.labeled_pairs() if x.pair_id == got["pair_id"]]
    assert (lp.choice, lp.labeler) == ("tie", "page:durable")


# ---------------------------------------------------------------- two automatic rounds, end to end

def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_two_online_rounds_grow_the_data_and_retrain_the_pm(ray_cluster, tiny_model, tmp_path):
    """Unattended rounds with a "gold" PM as labeler (the tiny backbone with an untrained
    head: an arbitrary but fixed judge, which, unlike the kind-words rule, rarely calls the
    tiny random policy's responses a tie)."""
    from hh_ray.models import load_scalar_head_model, save_model
    from hh_ray.orchestration.online import online, round_dir
    from hh_ray.tracking import read_metrics

    gold, gold_tok = load_scalar_head_model(tiny_model)
    save_model(gold, gold_tok, tmp_path / "gold-pm")
    n = 32
    cfg = tiny_config(**{"online.rounds": 2, "online.comparisons_per_round": n,
                         "online.labeler": f"pm:{tmp_path / 'gold-pm'}", "online.base_data": False,
                         "online.ppo_iterations": 1, "data.num_synthetic": 64, "pm.batch_size": 8,
                         "ppo.rollout_batch_size": 8, "ppo.minibatch_size": 8, "ppo.eval_prompts": 8,
                         "generation.max_new_tokens": 16})
    run = tmp_path / "online"
    t0 = time.time()
    rounds = online(cfg, run)
    print(f"two online rounds: {time.time() - t0:.1f}s")
    assert [r["round"] for r in rounds] == [0, 1]
    store = ComparisonStore(run / "comparisons.sqlite")
    assert store.count_labels(round=0) == n and store.count_labels(round=1) == n
    assert {lp.labeler for lp in store.labeled_pairs()} == {f"pm:{(tmp_path / 'gold-pm').resolve()}"}

    # Round 0 compared two samples of the initial policy; round 1 the new snapshot against it.
    r0_pairs, r1_pairs = store.labeled_pairs((0, 0)), store.labeled_pairs((1, 1))
    initial, snapshot1 = str(Path(tiny_model).resolve()), str(round_dir(run, 0) / "ppo" / "policy")
    assert {(p.snapshot_a, p.snapshot_b) for p in r0_pairs} == {(initial, initial)}
    assert {(p.snapshot_a, p.snapshot_b) for p in r1_pairs} == {(snapshot1, initial)}

    # The data grew: round 1's PM file holds everything round 0's did, and round 1's new pairs.
    d0, d1 = _lines(round_dir(run, 0) / "pm_data.jsonl"), _lines(round_dir(run, 1) / "pm_data.jsonl")
    fresh1 = rounds[1]["comparisons_trainable"]
    assert fresh1 > 0 and len(d1) == len(d0) + fresh1 and set(d0) <= set(d1)
    # ... and the PM was retrained from scratch on it: its trainer read the larger file.
    pm_data = [read_metrics(round_dir(run, k) / "pm_run", "pm_data")[0] for k in (0, 1)]
    assert [p["train_pairs"] + p["held_out_pairs"] for p in pm_data] == [len(d0), len(d1)]
    done = [read_metrics(round_dir(run, k) / "pm_run", "pm_done")[-1] for k in (0, 1)]
    assert done[1]["examples_seen"] > done[0]["examples_seen"]
    assert rounds[1]["pm"] != rounds[0]["pm"] and (Path(rounds[1]["pm"]) / "config.json").exists()

    # Per-round metrics.
    for r in rounds:
        assert r["comparisons_collected"] == n
        assert 0 <= r["pm_accuracy_fresh_after"] <= 1
        assert isinstance(r["policy_reward_latest_pm"], float)
    assert "pm_accuracy_fresh_before" in rounds[1]   # the previous PM on data it never saw
    assert set(rounds[1]["snapshot_elo"]) == {initial, snapshot1} and rounds[0]["snapshot_elo"] == {}
    logged = read_metrics(run, "online")
    assert [m["step"] for m in logged] == [0, 1]

    # Resume: a run killed after round 1's PPO redoes only what was left (evaluate).
    state = json.loads((run / "online_state.json").read_text())
    state.update(round=1, done=["collect", "pm", "ppo"])
    (run / "online_state.json").write_text(json.dumps(state))
    (round_dir(run, 1) / "summary.json").unlink()
    pm_mtime = (Path(rounds[1]["pm"]) / "config.json").stat().st_mtime
    again = online(cfg, run, resume=True)
    assert again[1]["snapshot_elo"] == pytest.approx(rounds[1]["snapshot_elo"])
    assert store.count_pairs() == 2 * n and (Path(rounds[1]["pm"]) / "config.json").stat().st_mtime == pm_mtime
    with pytest.raises(ValueError, match="--resume"):
        online(cfg, run)


def test_page_round_waits_for_people_then_takes_the_page_down(ray_cluster, tiny_model, tmp_path):
    """online.collector=page: the round deploys the page and goes on once people have given
    its comparisons (here: plain HTTP clients), then removes the page."""
    from ray import serve

    from hh_ray.orchestration.online import OnlineRLHF

    port = _free_port()
    cfg = tiny_config(**{"online.collector": "page", "online.comparisons_per_round": 2, "collect.port": port,
                         "data.num_synthetic": 64, "generation.max_new_tokens": 8})
    loop = OnlineRLHF(cfg, tmp_path / "run")
    result, errors = {}, []

    def collect():
        try:
            result.update(loop.collect(0))
        except Exception as e:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(e)

    worker = threading.Thread(target=collect)
    worker.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while not errors and time.time() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        for text, choice in (("How do I bake bread?", "a"), ("Any tips for chess?", "both_bad")):
            pid = httpx.post(url + "/api/respond", json={"messages": [{"role": "user", "content": text}]},
                             timeout=120).json()["pair_id"]
            assert httpx.post(url + "/api/label", json={"pair_id": pid, "choice": choice, "labeler": "person"},
                              timeout=60).status_code == 200
        worker.join(timeout=120)
        assert not errors and not worker.is_alive()
        assert result["comparisons_collected"] == 2 and result["comparisons_trainable"] <= 1
        assert result["comparisons_both_bad"] == 1
        assert httpx.get(url + "/healthz", timeout=10).status_code == 404  # the round took the page down
    finally:
        serve.shutdown()  # later modules start Serve on their own port
