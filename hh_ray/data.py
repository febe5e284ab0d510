"""HH-RLHF comparisons: parsing, loading, prompts, and a synthetic offline set.

An HH transcript is "\\n\\nHuman: ...\\n\\nAssistant: ..." (possibly many turns).
A comparison pair shares its context; the responses are what follows it.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


class DataError(ValueError):
    """Bad input, with the file and line it came from."""


@dataclass(frozen=True)
class Comparison:
    prompt: str  # the shared context, ending with "\n\nAssistant:"
    chosen: str  # preferred response (text after the prompt)
    rejected: str

    @property
    def num_turns(self) -> int:
        """Human turns in the context (1 = single-turn)."""
        return self.prompt.count(HUMAN)

    def to_record(self) -> dict:
        return {"chosen": self.prompt + self.chosen, "rejected": self.prompt + self.rejected}


def _common_prefix(a: str, b: str) -> str:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return a[:i]


def split_pair(chosen: str, rejected: str) -> Comparison:
    """Split two transcripts into (prompt, chosen response, rejected response).

    The prompt is the longest common prefix backed off to the last
    "\\n\\nAssistant:" inside it. Splitting each transcript on its own last
    "\\n\\nAssistant:" is wrong when a response itself contains that string.
    """
    if chosen == rejected:
        raise DataError("chosen and rejected transcripts are identical")
    prefix = _common_prefix(chosen, rejected)
    cut = prefix.rfind(ASSISTANT)
    if cut < 0:
        raise DataError("no shared '\\n\\nAssistant:' turn: cannot find the prompt")
    prompt = prefix[: cut + len(ASSISTANT)]
    c, r = chosen[len(prompt):], rejected[len(prompt):]
    for name, resp in (("chosen", c), ("rejected", r)):
        if not resp.strip():
            raise DataError(f"empty {name} response")
    return Comparison(prompt, c, r)


def first_prompt(transcript: str) -> str:
    """The context up to and including the first Assistant turn marker (red-team transcripts)."""
    cut = transcript.find(ASSISTANT)
    if cut < 0 or HUMAN not in transcript[:cut]:
        raise DataError("no Human turn followed by an Assistant turn")
    return transcript[: cut + len(ASSISTANT)]


# ---------------------------------------------------------------- loading

def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _files(source: Path, data_dir: str, split: str) -> list[Path]:
    if source.is_file():
        return [source]
    root = source / data_dir if data_dir else source
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    named = [p for ext in (".jsonl", ".jsonl.gz") for p in sorted(root.rglob(f"{split}{ext}"))]
    found = named or sorted(p for p in root.rglob("*") if p.name.endswith((".jsonl", ".jsonl.gz")))
    if not found:
        raise DataError(f"{root}: no .jsonl or .jsonl.gz files (looked for {split}.jsonl[.gz])")
    return found


def read_jsonl(path: Path, skip_bad: bool = False, counter: dict | None = None):
    """Yield (line number, record) from a .jsonl or .jsonl.gz file."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if skip_bad and counter is not None:
                    counter["skipped"] = counter.get("skipped", 0) + 1
                    continue
                raise DataError(f"{path}:{lineno}: malformed JSON: {e}") from None
            yield lineno, rec


def comparisons_from_records(records, where: str = "record", skip_bad: bool = False, counter: dict | None = None,
                             skip_identical: bool = False):
    """Parse (location, {'chosen', 'rejected'}) pairs; errors name the location.

    With skip_identical, pairs whose chosen == rejected (no preference to learn)
    are counted in counter['identical'] and skipped even without skip_bad."""
    out = []
    for loc, rec in records:
        try:
            for key in ("chosen", "rejected"):
                if not isinstance(rec.get(key), str):
                    raise DataError(f"missing or non-string field {key!r}")
            if skip_identical and rec["chosen"] == rec["rejected"]:
                if counter is not None:
                    counter["identical"] = counter.get("identical", 0) + 1
                continue
            out.append(split_pair(rec["chosen"], rec["rejected"]))
        except DataError as e:
            if skip_bad:
                if counter is not None:
                    counter["skipped"] = counter.get("skipped", 0) + 1
                continue
            raise DataError(f"{where}:{loc}: {e}") from None
    return out


def load_comparisons(source: str, data_dir: str = "", split: str = "train",
                     skip_bad: bool = False, num_synthetic: int = 4000, seed: int = 0,
                     counter: dict | None = None, skip_identical: bool = False) -> list[Comparison]:
    """Comparisons from 'synthetic', a local .jsonl[.gz] file/folder, or a hub dataset name.

    With skip_bad, bad records are counted in counter['skipped'] instead of raising;
    with skip_identical, chosen == rejected pairs are counted in counter['identical'].
    """
    counter = counter if counter is not None else {}
    if source == "synthetic":
        return synthetic_comparisons(num_synthetic, seed=seed)
    path = Path(source).expanduser()
    if path.exists():
        out = []
        for f in _files(path, data_dir, split):
            out += comparisons_from_records(read_jsonl(f, skip_bad, counter), str(f), skip_bad, counter, skip_identical)
    else:
        import datasets  # the real hub path; needs network or a warm HF cache

        ds = datasets.load_dataset(source, data_dir=data_dir or None, split=split)
        out = comparisons_from_records(enumerate(ds), f"{source}[{split}]", skip_bad, counter, skip_identical)
    if not out:
        raise DataError(f"{source}: no comparisons found")
    return out


def load_red_team(source: str, split: str = "train") -> list[tuple[str, float]]:
    """(first prompt, harmlessness score) from red-team attempts (schema: transcript +
    min_harmlessness_score_transcript); lower scores are more harmful."""
    path = Path(source).expanduser()
    if path.exists():
        records = [(f"{f}:{n}", r) for f in _files(path, "", split) for n, r in read_jsonl(f)]
    else:
        import datasets

        records = list(enumerate(datasets.load_dataset(source, data_dir="red-team-attempts", split=split)))
    out = []
    for loc, rec in records:
        if "transcript" not in rec:
            raise DataError(f"{loc}: missing field 'transcript'")
        score = rec.get("min_harmlessness_score_transcript", rec.get("rating", 0.0))
        try:
            out.append((first_prompt(rec["transcript"]), float(score)))
        except DataError as e:
            raise DataError(f"{loc}: {e}") from None
    return out


def prompts_of(comparisons: list[Comparison]) -> list[str]:
    """PPO prompts: the contexts of the comparisons, deduplicated, first-seen order."""
    return list(dict.fromkeys(c.prompt for c in comparisons))


def train_eval_split(items: list, eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Deterministic shuffle-and-split."""
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(len(items) * eval_fraction)) if eval_fraction > 0 else 0
    return [items[i] for i in idx[n_eval:]], [items[i] for i in idx[:n_eval]]


def write_jsonl(comparisons: list[Comparison], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for c in comparisons:
            f.write(json.dumps(c.to_record()) + "\n")


# ---------------------------------------------------------------- synthetic set
# The rule a PM must learn and a policy can move toward: the preferred response
# uses strictly more words from KIND_WORDS than the rejected one. The score is
# graded (more kind words, better), so PPO can climb it token by token.

KIND_WORDS = ["glad", "happy", "sure", "certainly", "gladly", "welcome", "kindly", "thanks", "please", "great"]
PLAIN_WORDS = ["no", "whatever", "busy", "later", "maybe", "meh", "nope", "fine", "ok", "dunno"]
TOPICS = ["cooking", "gardening", "chess", "physics", "music", "travel", "history", "running",
          "painting", "coding", "birds", "poetry", "cycling", "baking", "astronomy", "fishing"]
QUESTIONS = ["Can you tell me about {t}?", "How do I get better at {t}?", "What is the best thing about {t}?",
             "Any tips for {t}?", "Why do people like {t}?", "Where should I start with {t}?"]


def _response(rng: random.Random, topic: str, n_kind: int, length: int) -> str:
    words = [rng.choice(KIND_WORDS) for _ in range(n_kind)] + [rng.choice(PLAIN_WORDS) for _ in range(length - n_kind)]
    rng.shuffle(words)
    words.insert(rng.randrange(len(words) + 1), topic)
    return " " + " ".join(words) + "."


def synthetic_comparisons(n: int, seed: int = 0) -> list[Comparison]:
    """n deterministic HH-format comparisons (single- and two-turn) following the rule above."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        prompt = f"{HUMAN} {rng.choice(QUESTIONS).format(t=topic)}{ASSISTANT}"
        if rng.random() < 0.3:  # a second turn, so multi-turn contexts are exercised
            earlier = rng.choice(TOPICS)
            prompt = (f"{HUMAN} {rng.choice(QUESTIONS).format(t=earlier)}{ASSISTANT}"
                      f"{_response(rng, earlier, 3, 6)}{prompt}")
        length = rng.randint(5, 10)
        lo = rng.randint(0, length - 1)
        hi = rng.randint(lo + 1, length)
        c, r = _response(rng, topic, hi, length), _response(rng, topic, lo, length)
        out.append(Comparison(prompt, c, r))
    return out


def kind_fraction(text: str) -> float:
    """The synthetic rule's property: the share of words that are KIND_WORDS."""
    words = [w.strip(".,!?").lower() for w in text.split()]
    return sum(w in KIND_WORDS for w in words) / max(1, len(words))
