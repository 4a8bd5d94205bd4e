"""The feedback database: SQLite in WAL mode, one transaction per judgment.

Tables (see SCHEMA):

* items      one comparison as shown: the prompt, response A (left) and response B (right),
             and for each side the system that produced it (checkpoint path + sha256,
             sampling settings, template, seed). An item's id is a hash of the prompt, its
             index among the prompt's pairs and both systems, so a restarted server with the
             same settings recomputes the same ids and knows what is labeled already.
* judgments  which response is better: a | b | tie | both_bad, by one annotator, at a time.
             UNIQUE(item_id, annotator): an annotator judges an item once; UNIQUE(client_id):
             a retried submission (same client-generated id) is recognised, not duplicated.
* ratings    thumbs up/down and comments on one response, append-only events (UNIQUE
             client_id); an annotator's current rating of a response is their latest event.

Durability: every write is its own `BEGIN IMMEDIATE ... COMMIT` with synchronous=FULL, so a
judgment the server acknowledged survives a SIGKILL (or power loss) of the server; WAL lets
readers and the one writer work at once. All SQL takes parameters, never formatted values.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

SCHEMA_VERSION = 1
CHOICES = ("a", "b", "tie", "both_bad")
SIDES = ("a", "b")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    id              TEXT PRIMARY KEY,
    position        INTEGER NOT NULL,  -- index of the prompt in the prompts file it came from
    pair_index      INTEGER NOT NULL,  -- which of the prompt's pairs (pairs_per_prompt)
    prompt          TEXT NOT NULL,     -- as given (the reward stage renders it with its template)
    rendered_prompt TEXT NOT NULL,     -- what the models were given
    response_a      TEXT NOT NULL,     -- shown on the left, as "A"
    response_b      TEXT NOT NULL,
    system_a        TEXT NOT NULL,     -- JSON: name, ckpt, ckpt_sha256, stage, sampling settings, template, seed
    system_b        TEXT NOT NULL,
    created_at      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS judgments (
    id         INTEGER PRIMARY KEY,
    client_id  TEXT NOT NULL UNIQUE,
    item_id    TEXT NOT NULL REFERENCES items(id),
    annotator  TEXT NOT NULL,
    choice     TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
    comment    TEXT,
    created_at TEXT NOT NULL,
    UNIQUE (item_id, annotator)
);
CREATE TABLE IF NOT EXISTS ratings (
    id         INTEGER PRIMARY KEY,
    client_id  TEXT NOT NULL UNIQUE,
    item_id    TEXT NOT NULL REFERENCES items(id),
    side       TEXT NOT NULL CHECK (side IN ('a', 'b')),
    annotator  TEXT NOT NULL,
    thumb      INTEGER CHECK (thumb IN (-1, 1)),  -- NULL: no thumb (a comment only)
    comment    TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ratings_by_response ON ratings (item_id, side, annotator, id);
CREATE INDEX IF NOT EXISTS judgments_by_annotator ON judgments (annotator, item_id);
-- Every judgment with everything it was made on, for reading the database by hand.
CREATE VIEW IF NOT EXISTS judgments_full AS
    SELECT j.id, j.client_id, j.annotator, j.choice, j.comment, j.created_at, j.item_id,
           i.prompt, i.rendered_prompt, i.response_a, i.response_b, i.system_a, i.system_b
    FROM judgments j JOIN items i ON i.id = j.item_id;
"""


class StoreError(ValueError):
    """A request the database refuses; `status` is the HTTP status the API answers with."""

    status = 400


class NotFound(StoreError):
    status = 404


class Conflict(StoreError):
    status = 409


def now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


@dataclass
class Item:
    id: str
    position: int
    pair_index: int
    prompt: str
    rendered_prompt: str
    response_a: str
    response_b: str
    system_a: dict
    system_b: dict
    created_at: str = ""

    def public(self) -> dict:
        """What the page shows: no system names (labeling is blind)."""
        return {
            "id": self.id,
            "position": self.position,
            "prompt": self.prompt,
            "response_a": self.response_a,
            "response_b": self.response_b,
        }


def _item(row: sqlite3.Row) -> Item:
    return Item(
        row["id"],
        row["position"],
        row["pair_index"],
        row["prompt"],
        row["rendered_prompt"],
        row["response_a"],
        row["response_b"],
        json.loads(row["system_a"]),
        json.loads(row["system_b"]),
        row["created_at"],
    )


class Store:
    """The feedback database. Thread-safe: every operation opens its own short connection."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"feedback database {self.path}: no such file")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if not readonly:
                with self._connect() as con:
                    con.execute("PRAGMA journal_mode=WAL")
                    con.executescript(SCHEMA)
                    con.execute(
                        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                    )
            with self._connect() as con:
                version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a feedback database ({e})") from None
        if version is None or int(version[0]) != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: not a feedback database of schema version {SCHEMA_VERSION}")

    # ------------------------------------------------------------------ connections
    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            con = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=30,
                isolation_level=None,
                check_same_thread=False,
            )
        else:
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA synchronous=FULL")
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA busy_timeout=30000")
        con.execute("PRAGMA foreign_keys=ON")
        return _Closing(con)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as con:
            yield con

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One transaction holding the write lock from its start (no upgrade deadlocks)."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # ------------------------------------------------------------------------ items
    def add_item(self, item: Item) -> Item:
        """Insert an item unless one with its id exists; the stored item either way."""
        with self.write() as con:
            con.execute(
                "INSERT OR IGNORE INTO items (id, position, pair_index, prompt, rendered_prompt, response_a,"
                " response_b, system_a, system_b, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    item.id,
                    item.position,
                    item.pair_index,
                    item.prompt,
                    item.rendered_prompt,
                    item.response_a,
                    item.response_b,
                    json.dumps(item.system_a, sort_keys=True),
                    json.dumps(item.system_b, sort_keys=True),
                    item.created_at or now(),
                ),
            )
        return self.get_item(item.id)

    def get_item(self, item_id: str) -> Item | None:
        with self.read() as con:
            row = con.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        return _item(row) if row is not None else None

    def existing_items(self, ids: Iterable[str]) -> set[str]:
        ids = list(ids)
        found: set[str] = set()
        with self.read() as con:
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                marks = ",".join("?" * len(chunk))
                found |= {r[0] for r in con.execute(f"SELECT id FROM items WHERE id IN ({marks})", chunk)}
        return found

    def items(self) -> list[Item]:
        with self.read() as con:
            return [_item(r) for r in con.execute("SELECT * FROM items ORDER BY position, pair_index")]

    # -------------------------------------------------------------------- judgments
    def labeled_by(self, annotator: str) -> set[str]:
        with self.read() as con:
            return {r[0] for r in con.execute("SELECT item_id FROM judgments WHERE annotator = ?", (annotator,))}

    def add_judgment(
        self, client_id: str, item_id: str, annotator: str, choice: str, comment: str | None = None
    ) -> tuple[dict, bool]:
        """(the stored judgment, created). A replay of the same client_id and content returns the
        stored row (created False); anything else that would duplicate a judgment is a Conflict."""
        if choice not in CHOICES:
            raise StoreError(f"choice {choice!r} is not one of {', '.join(CHOICES)}")
        with self.write() as con:
            row = con.execute("SELECT * FROM judgments WHERE client_id = ?", (client_id,)).fetchone()
            if row is not None:
                if (row["item_id"], row["annotator"], row["choice"]) != (item_id, annotator, choice):
                    raise Conflict(f"client_id {client_id!r} was already used for another judgment")
                return dict(row), False
            if con.execute("SELECT 1 FROM items WHERE id = ?", (item_id,)).fetchone() is None:
                raise NotFound(f"unknown item_id {item_id!r}")
            prior = con.execute(
                "SELECT choice FROM judgments WHERE item_id = ? AND annotator = ?", (item_id, annotator)
            ).fetchone()
            if prior is not None:
                raise Conflict(
                    f"annotator {annotator!r} already judged item {item_id!r} "
                    f"(choice {prior['choice']!r}); a judgment is made once"
                )
            try:
                cur = con.execute(
                    "INSERT INTO judgments (client_id, item_id, annotator, choice, comment, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (client_id, item_id, annotator, choice, comment or None, now()),
                )
            except sqlite3.IntegrityError as e:  # the constraints are the last line of defence
                raise Conflict(f"judgment refused by the database: {e}") from None
            row = con.execute("SELECT * FROM judgments WHERE id = ?", (cur.lastrowid,)).fetchone()
        return dict(row), True

    def judgments(self, item_ids: Iterable[str] | None = None) -> list[dict]:
        with self.read() as con:
            rows = [dict(r) for r in con.execute("SELECT * FROM judgments ORDER BY id")]
        if item_ids is not None:
            keep = set(item_ids)
            rows = [r for r in rows if r["item_id"] in keep]
        return rows

    # ---------------------------------------------------------------------- ratings
    def add_rating(
        self, client_id: str, item_id: str, side: str, annotator: str, thumb: int | None, comment: str | None
    ) -> tuple[dict, bool]:
        """Append a rating event (the annotator's current thumb and comment on one response)."""
        if side not in SIDES:
            raise StoreError(f"side {side!r} is not 'a' or 'b'")
        if thumb not in (None, -1, 1):
            raise StoreError(f"thumb {thumb!r} is not 1 (up), -1 (down) or null")
        with self.write() as con:
            row = con.execute("SELECT * FROM ratings WHERE client_id = ?", (client_id,)).fetchone()
            if row is not None:
                same = (row["item_id"], row["side"], row["annotator"], row["thumb"], row["comment"]) == (
                    item_id,
                    side,
                    annotator,
                    thumb,
                    comment or None,
                )
                if not same:
                    raise Conflict(f"client_id {client_id!r} was already used for another rating")
                return dict(row), False
            if con.execute("SELECT 1 FROM items WHERE id = ?", (item_id,)).fetchone() is None:
                raise NotFound(f"unknown item_id {item_id!r}")
            cur = con.execute(
                "INSERT INTO ratings (client_id, item_id, side, annotator, thumb, comment, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (client_id, item_id, side, annotator, thumb, comment or None, now()),
            )
            row = con.execute("SELECT * FROM ratings WHERE id = ?", (cur.lastrowid,)).fetchone()
        return dict(row), True

    def current_ratings(self, annotator: str | None = None) -> list[dict]:
        """Each (item, side, annotator)'s latest rating event."""
        sql = (
            "SELECT r.* FROM ratings r JOIN (SELECT MAX(id) AS id FROM ratings GROUP BY item_id, side, annotator)"
            " latest ON latest.id = r.id"
        )
        args: tuple = ()
        if annotator is not None:
            sql += " WHERE r.annotator = ?"
            args = (annotator,)
        with self.read() as con:
            return [dict(r) for r in con.execute(sql + " ORDER BY r.id", args)]

    def counts(self) -> dict[str, int]:
        with self.read() as con:
            return {
                t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("items", "judgments", "ratings")
            }


class _Closing:
    """A connection that closes at the end of its `with` block (sqlite3's own only commits)."""

    def __init__(self, con: sqlite3.Connection):
        self.con = con

    def __getattr__(self, name: str) -> Any:
        return getattr(self.con, name)

    def __enter__(self) -> sqlite3.Connection:
        return self.con

    def __exit__(self, *exc) -> None:
        self.con.close()
