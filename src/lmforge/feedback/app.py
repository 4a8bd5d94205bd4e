"""The feedback web app: a queue of response pairs to judge, a JSON API, and the page.

A session is a prompts file and two systems (a checkpoint at a temperature, or two
checkpoints). Every prompt gives `pairs_per_prompt` items; an item is generated the first time
it is needed (and a few ahead of the annotator, in a background thread), then stored, so every
annotator judges the same two responses and a restarted server serves the stored ones. Which
system is shown on the left is decided per item by its id (shuffle_sides): annotators cannot
learn a side's habits, and the win-rate statistics map sides back to systems.

API (JSON; with an access token, every request carries it: header `X-Lmforge-Token`,
`Authorization: Bearer ...` or the cookie the page gets from `/?token=...`):

    GET  /api/config                          annotator default, session size
    GET  /api/next?annotator=&after=<item>    the next item this annotator has not judged
                                              (after: skip to items after that one, wrapping)
    GET  /api/items/{item_id}?annotator=      an item, with this annotator's judgment and ratings
    POST /api/judgments  {client_id, item_id, annotator, choice: a|b|tie|both_bad, comment?}
    POST /api/ratings    {client_id, item_id, annotator, side: a|b, thumb: up|down|null, comment?}
    GET  /api/stats?annotator=                progress, agreement, win rates

Submissions are idempotent: client_id is made by the client once per judgment and reused on
retries; a replay answers 200 with the stored row, a first write 201; a second, different
judgment of the same item by the same annotator is 409; unknown items 404; malformed bodies
422. Every answer to a refused request is {"error": "<what is wrong>"} and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Protocol, Sequence

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from lmforge.data.feedback_store import Item, NotFound, Store, StoreError, now
from lmforge.feedback.agreement import compute_stats

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_COOKIE = "lmforge_token"
TOKEN_HEADER = "x-lmforge-token"


# ===================================================================== what makes pairs


class PairSource(Protocol):
    """Two systems that answer prompts (the real one samples two checkpoints/temperatures)."""

    def systems(self) -> tuple[dict, dict]: ...

    def generate(self, rendered_prompts: list[str], seed: int) -> list[tuple[str, str]]: ...


@dataclass
class System:
    """One side of the comparison: a checkpoint and the settings it samples with."""

    name: str
    lm: Any  # lmforge.inference.language_model.LanguageModel
    settings: Any  # lmforge.inference.language_model.SamplingSettings
    seed: int = 0

    def describe(self) -> dict:
        return {"name": self.name, **self.lm.describe(), **self.settings.as_dict(), "seed": self.seed}


class ModelPairSource:
    def __init__(self, first: System, second: System, batch_size: int = 8):
        self.pair = (first, second)
        self.batch_size = batch_size
        self._described = (first.describe(), second.describe())

    def systems(self) -> tuple[dict, dict]:
        return self._described

    def generate(self, rendered_prompts: list[str], seed: int) -> list[tuple[str, str]]:
        from lmforge.inference.language_model import make_generator

        sides = []
        for k, system in enumerate(self.pair):
            gen = make_generator(seed * 2 + k, system.lm.device)
            sides.append([s.text for s in system.lm.sample(rendered_prompts, system.settings, gen, self.batch_size)])
        return list(zip(*sides))


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class Entry:
    position: int
    pair_index: int
    prompt: str
    rendered: str
    id: str
    swap: bool  # the second system is shown on the left


# ============================================================================ the session


class FeedbackSession:
    """The queue of items of one prompts file, generated on demand and ahead of annotators."""

    def __init__(
        self,
        store: Store,
        prompts: Sequence[str],
        source: PairSource,
        *,
        template: str = "{prompt}",
        pairs_per_prompt: int = 1,
        shuffle_sides: bool = True,
        prefetch: int = 4,
        seed: int = 0,
        background: bool = True,
    ):
        from lmforge.data.templates import render_prompt

        if not prompts:
            raise ValueError("no prompts to serve")
        if pairs_per_prompt < 1:
            raise ValueError(f"pairs_per_prompt={pairs_per_prompt} must be >= 1")
        self.store, self.source, self.seed = store, source, seed
        self.prefetch = max(0, prefetch)
        sys1, sys2 = source.systems()
        fingerprints = (_hash(sys1), _hash(sys2))
        self.entries: list[Entry] = []
        for position, prompt in enumerate(prompts):
            rendered = render_prompt(template, prompt)
            for k in range(pairs_per_prompt):
                item_id = _hash(prompt, rendered, k, *fingerprints)[:24]
                swap = shuffle_sides and int(_hash(item_id, "side")[:8], 16) % 2 == 1
                self.entries.append(Entry(position, k, prompt, rendered, item_id, swap))
        self.index = {e.id: i for i, e in enumerate(self.entries)}
        if len(self.index) != len(self.entries):  # a prompt listed twice: one item is enough
            seen: set[str] = set()
            self.entries = [e for e in self.entries if not (e.id in seen or seen.add(e.id))]
            self.index = {e.id: i for i, e in enumerate(self.entries)}
        self.ids = [e.id for e in self.entries]
        self._items: dict[str, Item] = {i.id: i for i in store.items() if i.id in self.index}
        self._gen_lock = threading.Lock()
        self._cond = threading.Condition()
        self._wanted: list[int] = []
        self._closed = False
        self._worker: threading.Thread | None = None
        if background and self.prefetch:
            self._worker = threading.Thread(target=self._work, name="feedback-prefetch", daemon=True)
            self._worker.start()
            self.want(range(min(self.prefetch, len(self.entries))))

    # -------------------------------------------------------------------- generation
    def generated(self, item_id: str) -> bool:
        return item_id in self._items

    def ensure(self, indices: Sequence[int]) -> list[Item]:
        """The items at these queue indices, generating (and storing) the missing ones."""
        with self._gen_lock:
            missing = [i for i in indices if self.entries[i].id not in self._items]
            if missing:
                entries = [self.entries[i] for i in missing]
                pairs = self.source.generate(
                    [e.rendered for e in entries], seed=int(_hash(self.seed, entries[0].id)[:8], 16)
                )
                sys1, sys2 = self.source.systems()
                for e, (r1, r2) in zip(entries, pairs):
                    (ra, sa), (rb, sb) = ((r2, sys2), (r1, sys1)) if e.swap else ((r1, sys1), (r2, sys2))
                    item = Item(e.id, e.position, e.pair_index, e.prompt, e.rendered, ra, rb, sa, sb, now())
                    # INSERT OR IGNORE: another server on the same database may have stored it first
                    self._items[e.id] = self.store.add_item(item)
        return [self._items[self.entries[i].id] for i in indices]

    def want(self, indices) -> None:
        """Ask the background thread to generate these items (soon, in order)."""
        with self._cond:
            for i in indices:
                if self.entries[i].id not in self._items and i not in self._wanted:
                    self._wanted.append(i)
            self._cond.notify()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._wanted and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch, self._wanted = self._wanted[: self.prefetch], self._wanted[self.prefetch :]
            try:
                self.ensure(batch)
            except Exception:  # noqa: BLE001 - a failed prefetch is retried on demand
                log.exception("feedback: generating items ahead failed; they are generated when asked for")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ------------------------------------------------------------------------- queue
    def next_item(self, annotator: str, after: str | None = None) -> Item | None:
        """The first item after `after` (wrapping around) this annotator has not judged."""
        done = self.store.labeled_by(annotator)
        n = len(self.entries)
        start = self.index[after] + 1 if after in self.index else 0
        order = [(start + k) % n for k in range(n)]
        todo = [i for i in order if self.entries[i].id not in done]
        if not todo:
            return None
        item = self.ensure([todo[0]])[0]
        self.want(todo[1 : 1 + self.prefetch])
        return item

    def item(self, item_id: str) -> Item | None:
        i = self.index.get(item_id)
        return None if i is None else self.ensure([i])[0]

    def stats(self, annotator: str) -> dict:
        return compute_stats(self.store, self.ids, annotator, dict(self._items))


# ================================================================================= the API

NAME_PATTERN = r"^[^\x00-\x1f\x7f]{1,64}$"  # annotator names: 1-64 characters, no control characters
ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"  # client-generated submission ids (UUIDs)


class JudgmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client_id: str = Field(pattern=ID_PATTERN)
    item_id: str = Field(max_length=64)
    annotator: str = Field(pattern=NAME_PATTERN)
    choice: Literal["a", "b", "tie", "both_bad"]
    comment: Optional[str] = Field(default=None, max_length=4000)


class RatingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client_id: str = Field(pattern=ID_PATTERN)
    item_id: str = Field(max_length=64)
    annotator: str = Field(pattern=NAME_PATTERN)
    side: Literal["a", "b"]
    thumb: Optional[Literal["up", "down"]] = None
    comment: Optional[str] = Field(default=None, max_length=4000)


def create_app(
    session: FeedbackSession,
    *,
    annotator: str = "anonymous",
    token: str | None = None,
    allowed_hosts: Sequence[str] | None = None,
    title: str = "lmforge feedback",
):
    """The FastAPI app. token: required on every request when given. allowed_hosts: accepted
    Host header names (a loopback server refuses other names: DNS rebinding)."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.session = session
    hosts = {h.lower() for h in allowed_hosts} if allowed_hosts else None

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = []
        for e in exc.errors():
            if e.get("type") == "json_invalid":
                problems.append(f"malformed JSON body ({(e.get('ctx') or {}).get('error', 'cannot be parsed')})")
                continue
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {e.get('msg')}")
        return JSONResponse({"error": "invalid request: " + "; ".join(problems)}, status_code=422)

    @app.exception_handler(StoreError)
    async def refused(request: Request, exc: StoreError):
        return error(exc.status, str(exc))

    def host_name(request: Request) -> str:
        host = request.headers.get("host", "").lower()
        if host.startswith("["):
            return host[1 : host.find("]")] if "]" in host else host
        return host.rsplit(":", 1)[0] if host.count(":") == 1 else host

    def has_token(request: Request) -> bool:
        supplied = request.headers.get(TOKEN_HEADER) or request.cookies.get(TOKEN_COOKIE) or ""
        auth = request.headers.get("authorization", "")
        if not supplied and auth.lower().startswith("bearer "):
            supplied = auth[7:].strip()
        return secrets.compare_digest(supplied.encode(), token.encode())

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if hosts is not None and host_name(request) not in hosts:
            return PlainTextResponse(f"unexpected Host header; use http://{sorted(hosts)[0]}:<port>/", 400)
        if token is not None:
            given = request.query_params.get("token")
            if request.url.path == "/" and given is not None:
                if not secrets.compare_digest(given.encode(), token.encode()):
                    return PlainTextResponse("wrong access token", 401)
                response = RedirectResponse("/", status_code=303)  # the token leaves the address bar
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
                return response
            if not has_token(request):
                if request.url.path.startswith("/api/"):
                    return error(
                        401,
                        "access token required: send the X-Lmforge-Token header, or open the page "
                        "once as /?token=<token>",
                    )
                return PlainTextResponse("access token required: open /?token=<token> (printed by the server)", 401)
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    def with_mine(item: Item, who: str) -> dict:
        store = session.store
        judgment = next((j for j in store.judgments([item.id]) if j["annotator"] == who), None)
        ratings = {
            r["side"]: {"thumb": {1: "up", -1: "down"}.get(r["thumb"]), "comment": r["comment"]}
            for r in store.current_ratings(who)
            if r["item_id"] == item.id
        }
        return {
            **item.public(),
            "index": session.index[item.id],
            "judgment": judgment and judgment["choice"],
            "ratings": ratings,
        }

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/config")
    def config():
        return {
            "annotator": annotator,
            "total": len(session.entries),
            "title": title,
            "systems": [
                {"name": s.get("name", "?"), "description": describe_system(s)} for s in session.source.systems()
            ],
        }

    @app.get("/api/next")
    def next_item(annotator: str = Query(pattern=NAME_PATTERN), after: Optional[str] = Query(None, max_length=64)):
        if after and after not in session.index:
            raise _not_found(after)
        item = session.next_item(annotator, after or None)
        return {"item": with_mine(item, annotator) if item else None, "stats": session.stats(annotator)}

    @app.get("/api/items/{item_id}")
    def get_item(item_id: str, annotator: str = Query(pattern=NAME_PATTERN)):
        item = session.item(item_id)
        if item is None:
            raise _not_found(item_id)
        return {"item": with_mine(item, annotator)}

    @app.post("/api/judgments")
    def judge(body: JudgmentIn = Body()):
        if body.item_id not in session.index:
            raise _not_found(body.item_id)
        row, created = session.store.add_judgment(
            body.client_id, body.item_id, body.annotator, body.choice, body.comment
        )
        return JSONResponse(
            {"judgment": row, "replayed": not created, "stats": session.stats(body.annotator)},
            status_code=201 if created else 200,
        )

    @app.post("/api/ratings")
    def rate(body: RatingIn = Body()):
        if body.item_id not in session.index:
            raise _not_found(body.item_id)
        thumb = {"up": 1, "down": -1, None: None}[body.thumb]
        row, created = session.store.add_rating(
            body.client_id, body.item_id, body.side, body.annotator, thumb, body.comment
        )
        return JSONResponse({"rating": row, "replayed": not created}, status_code=201 if created else 200)

    @app.get("/api/stats")
    def stats(annotator: str = Query(pattern=NAME_PATTERN)):
        return session.stats(annotator)

    return app


def describe_system(s: dict) -> str:
    """'last.ckpt (sft, 3f2a9c1b) T=0.7 top_p=0.9' for the statistics panel."""
    parts = []
    if s.get("ckpt"):
        sha = s.get("ckpt_sha256", "")[:8]
        parts.append(f"{Path(s['ckpt']).name} ({', '.join(x for x in (s.get('stage'), sha) if x)})")
    for key, label in (("temperature", "T"), ("top_k", "top_k"), ("top_p", "top_p")):
        if s.get(key) is not None:
            parts.append(f"{label}={s[key]}")
    return " ".join(parts) or s.get("name", "?")


def _not_found(item_id: str) -> StoreError:
    return NotFound(f"unknown item_id {item_id!r}: not an item of this session")
