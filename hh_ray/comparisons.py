"""The comparison store: every pair shown to a labeler and every label, in one SQLite file.

A *pair* is a prompt (HH context ending in "\\n\\nAssistant:") with two
responses and the policy snapshot that wrote each; a *label* says which one
is better ('a' or 'b', with an optional strength 1–3), or 'tie' / 'both_bad'.
As in the paper, ties and "both bad" are kept in the database but are not
training data: the export skips them.

Preference strength (1 slightly, 2 clearly, 3 much better). The paper trains
its PMs only on comparisons stronger than the weakest rating, so a person's
"slightly better" (strength 1) is stored but not exported for training
(counted as `weakest`); a label without a strength is kept, since the person
did not say it was weak. This applies to labels from people only. A machine
labeler's strength (labeler id "rule:…" or "pm:…", hh_ray/labelers.py) is a
binning of its own score margin, not a rating: the kind-words rule is exact
even at a one-word margin, and a judge PM near ½ rates every label 1, so
dropping them would discard correct labels, or a whole online round.

Why SQLite, and these settings:
- WAL journal + `synchronous=FULL`: a commit returns only after the WAL is
  fsynced, so a label the server has acknowledged survives a killed server
  (and a power cut). `add_label` returns after the commit, and the server
  acknowledges after `add_label` returns.
- One connection per operation and `BEGIN IMMEDIATE`: the write lock is taken
  before reading, so two labelers (threads or processes) never both see "not
  labeled yet" for the same pair; the loser waits (busy timeout) and then sees
  the first label. Several processes may open the same file.
- Pair ids are random (uuid4): a label must name a pair this store handed
  out, and a label for a pair that already has one is refused (a replayed or
  double-submitted request changes nothing).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from hh_ray.data import ASSISTANT, Comparison, DataError, split_pair

CHOICES = ("a", "b", "tie", "both_bad")
TRAINABLE = ("a", "b")        # ties and "both bad" are stored, never trained on (paper)
STRENGTHS = (1, 2, 3)         # 1 slightly, 2 clearly, 3 much better
WEAKEST = 1                   # a person's weakest preference: stored, not trained on (paper)
MACHINE_LABELERS = ("rule:", "pm:")  # labeler-id prefixes of hh_ray/labelers.py; the page writes "page:"
MAX_LABELER_CHARS = 100

SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    id          TEXT PRIMARY KEY,
    round       INTEGER NOT NULL,
    prompt      TEXT NOT NULL,
    response_a  TEXT NOT NULL,
    response_b  TEXT NOT NULL,
    snapshot_a  TEXT NOT NULL,
    snapshot_b  TEXT NOT NULL,
    source      TEXT NOT NULL,
    created     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    pair_id     TEXT PRIMARY KEY REFERENCES pairs(id),
    choice      TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
    strength    INTEGER CHECK (strength IS NULL OR strength BETWEEN 1 AND 3),
    labeler     TEXT NOT NULL,
    created     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pairs_round ON pairs(round);
"""


class StoreError(ValueError):
    """Input the store refuses; nothing was written."""


class InvalidInput(StoreError):
    pass


class TextTooLong(StoreError):
    pass


class UnknownPair(StoreError):
    pass


class AlreadyLabeled(StoreError):
    pass


@dataclass(frozen=True)
class LabeledPair:
    pair_id: str
    round: int
    prompt: str
    response_a: str
    response_b: str
    snapshot_a: str
    snapshot_b: str
    choice: str
    strength: int | None
    labeler: str

    def to_comparison(self) -> Comparison | None:
        """The (chosen, rejected) comparison, or None for a tie / both bad."""
        if self.choice not in TRAINABLE:
            return None
        a, b = (self.response_a, self.response_b) if self.choice == "a" else (self.response_b, self.response_a)
        return Comparison(self.prompt, a, b)


# ---------------------------------------------------------------- checks (pure)

def check_text(name: str, text, max_chars: int) -> str:
    if not isinstance(text, str):
        raise InvalidInput(f"{name} must be a string")
    if len(text) > max_chars:
        raise TextTooLong(f"{name} is {len(text)} characters; the limit is {max_chars}")
    return text


def check_prompt(prompt: str, max_chars: int) -> str:
    check_text("prompt", prompt, max_chars)
    if not prompt.endswith(ASSISTANT):
        raise InvalidInput("prompt must be an HH context ending in '\\n\\nAssistant:'")
    return prompt


def check_label(choice, strength, labeler) -> tuple[str, int | None, str]:
    if choice not in CHOICES:
        raise InvalidInput(f"choice must be one of {', '.join(CHOICES)}, got {json.dumps(choice)[:40]}")
    if strength is not None and (isinstance(strength, bool) or strength not in STRENGTHS):
        raise InvalidInput(f"strength must be 1, 2, 3 or absent, got {json.dumps(strength)[:40]}")
    if strength is not None and choice not in TRAINABLE:
        raise InvalidInput(f"strength applies to a choice of 'a' or 'b', not {choice!r}")
    if not isinstance(labeler, str) or not labeler.strip() or len(labeler) > MAX_LABELER_CHARS:
        raise InvalidInput(f"labeler must be a non-empty string of at most {MAX_LABELER_CHARS} characters")
    return choice, strength, labeler.strip()


def weakest_preference(lp: LabeledPair) -> bool:
    """True for a person's label of the weakest strength, which the PM does not train on (see the
    module doc); a machine labeler's strength 1 is not a rating and does not count."""
    return lp.strength == WEAKEST and not lp.labeler.startswith(MACHINE_LABELERS)


def trainable(c: Comparison) -> bool:
    """True when the PM trainer will read this pair back exactly: both responses
    non-blank and different, and the HH split of the two transcripts gives the
    same prompt (it would not if, say, both responses start with "\\n\\nAssistant:")."""
    try:
        return split_pair(c.prompt + c.chosen, c.prompt + c.rejected) == c
    except DataError:
        return False


# ---------------------------------------------------------------- the store

class ComparisonStore:
    """Open (and create) the database at `path`. Cheap to construct: no
    connection is held, so an instance may be shared by threads and copied
    into Ray actors."""

    def __init__(self, path: str | Path, max_text_chars: int = 20_000, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.max_text_chars = max_text_chars
        self.busy_timeout_s = busy_timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
            db.executescript(SCHEMA)

    @contextlib.contextmanager
    def _connect(self):
        db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL")  # per connection: fsync the WAL at every commit
            db.execute("PRAGMA foreign_keys=ON")
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self):
        """A transaction holding the write lock from its start; committed on exit, rolled back on error."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ---- writes

    def _pair_row(self, p: dict, round: int, source: str, now: float) -> tuple:
        check_prompt(p["prompt"], self.max_text_chars)
        for k in ("response_a", "response_b"):
            check_text(k, p[k], self.max_text_chars)
        for k in ("snapshot_a", "snapshot_b"):
            check_text(k, p[k], 1000)
        return (uuid.uuid4().hex, round, p["prompt"], p["response_a"], p["response_b"],
                p["snapshot_a"], p["snapshot_b"], source, now)

    def add_pairs(self, pairs: list[dict], round: int = 0, source: str = "page") -> list[str]:
        """Store pairs ({prompt, response_a, response_b, snapshot_a, snapshot_b}) awaiting a
        label; returns their ids. All or nothing: one bad pair and none is written."""
        now = time.time()
        rows = [self._pair_row(p, round, source, now) for p in pairs]  # every check before any write
        with self._write() as db:
            db.executemany("INSERT INTO pairs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return [r[0] for r in rows]

    def add_pair(self, prompt: str, response_a: str, response_b: str, snapshot_a: str, snapshot_b: str,
                 round: int = 0, source: str = "page") -> str:
        return self.add_pairs([dict(prompt=prompt, response_a=response_a, response_b=response_b,
                                    snapshot_a=snapshot_a, snapshot_b=snapshot_b)], round, source)[0]

    def add_labels(self, labels: list[dict]) -> int:
        """Record labels ({pair_id, choice, labeler, strength?}). All or nothing: a label
        for an unknown pair, for a pair labeled already (a replay), or a bad field and
        none is written. Returns how many were written, once they are durable."""
        rows = []
        for lab in labels:
            choice, strength, labeler = check_label(lab.get("choice"), lab.get("strength"), lab.get("labeler"))
            if not isinstance(lab.get("pair_id"), str):
                raise InvalidInput("pair_id must be a string")
            rows.append((lab["pair_id"], choice, strength, labeler, time.time()))
        if len({r[0] for r in rows}) != len(rows):
            raise AlreadyLabeled("the same pair is labeled twice in one request")
        with self._write() as db:
            for r in rows:
                if db.execute("SELECT 1 FROM pairs WHERE id = ?", (r[0],)).fetchone() is None:
                    raise UnknownPair(f"no pair with id {r[0][:64]!r}")
                if db.execute("SELECT 1 FROM labels WHERE pair_id = ?", (r[0],)).fetchone() is not None:
                    raise AlreadyLabeled(f"pair {r[0]!r} is labeled already; a label cannot be replayed or changed")
            db.executemany("INSERT INTO labels VALUES (?, ?, ?, ?, ?)", rows)
        return len(rows)

    def add_label(self, pair_id: str, choice: str, labeler: str, strength: int | None = None) -> None:
        self.add_labels([dict(pair_id=pair_id, choice=choice, labeler=labeler, strength=strength)])

    # ---- reads

    def pair(self, pair_id: str) -> dict | None:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM pairs WHERE id = ?", (pair_id,)).fetchone()
        return dict(row) if row else None

    def count_pairs(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]

    def count_labels(self, round: int | None = None, choices: tuple[str, ...] = CHOICES) -> int:
        q = f"SELECT COUNT(*) FROM labels JOIN pairs ON pairs.id = labels.pair_id " \
            f"WHERE choice IN ({','.join('?' * len(choices))})"
        args: list = list(choices)
        if round is not None:
            q += " AND round = ?"
            args.append(round)
        with self._connect() as db:
            return db.execute(q, args).fetchone()[0]

    def labeled_pairs(self, rounds: tuple[int, int] | None = None) -> list[LabeledPair]:
        """Every labeled pair (rounds: inclusive (first, last) or all), oldest first."""
        q = ("SELECT pairs.id, round, prompt, response_a, response_b, snapshot_a, snapshot_b, choice, strength, "
             "labeler FROM labels JOIN pairs ON pairs.id = labels.pair_id")
        args: tuple = ()
        if rounds is not None:
            q += " WHERE round BETWEEN ? AND ?"
            args = rounds
        with self._connect() as db:
            rows = db.execute(q + " ORDER BY labels.created, pairs.id", args).fetchall()
        return [LabeledPair(*r) for r in rows]

    # ---- export

    def training_comparisons(self, rounds: tuple[int, int] | None = None) -> tuple[list[Comparison], dict]:
        """(comparisons for the PM, counts of what was left out and why): ties, "both bad", a
        person's weakest preferences (`weakest`) and pairs the trainer could not read back."""
        out, skipped = [], {"tie": 0, "both_bad": 0, "weakest": 0, "untrainable": 0}
        for lp in self.labeled_pairs(rounds):
            c = lp.to_comparison()
            if c is None:
                skipped[lp.choice] += 1
            elif weakest_preference(lp):
                skipped["weakest"] += 1
            elif not trainable(c):
                skipped["untrainable"] += 1
            else:
                out.append(c)
        return out, skipped

    def export_jsonl(self, path: str | Path, rounds: tuple[int, int] | None = None) -> dict:
        """Write the trainable labels as HH records ({"chosen", "rejected"} transcripts), the
        format `data.source=PATH` reads. Written to a temporary name, then renamed."""
        from hh_ray.data import write_jsonl

        comparisons, skipped = self.training_comparisons(rounds)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        write_jsonl(comparisons, tmp)
        tmp.replace(path)
        return {"written": len(comparisons), "skipped": skipped}
