"""The feedback app's API with FastAPI's TestClient (and a real uvicorn for concurrency):
every endpoint, refused requests that write nothing, idempotent submissions, restart, access."""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the feedback app needs the `feedback` extra (fastapi, uvicorn)")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

from fastapi.testclient import TestClient  # noqa: E402
from feedback_fixtures import FakeSource, ThreadServer  # noqa: E402

from lmforge.data.feedback_store import Store  # noqa: E402
from lmforge.errors import UsageError  # noqa: E402
from lmforge.feedback.__main__ import check_access, default_db  # noqa: E402
from lmforge.feedback.app import FeedbackSession, create_app  # noqa: E402

PROMPTS = ["What is 2 + 3?", "Reverse the word cat.", "<script>alert(1)</script>", "Name a color."]
TEMPLATE = "User: {prompt}\nAssistant:"


def make(tmp_path, prompts=PROMPTS, source=None, **app_kwargs):
    store = Store(tmp_path / "feedback.db")
    source = source or FakeSource()
    session = FeedbackSession(store, prompts, source, template=TEMPLATE, background=False)
    app = create_app(session, annotator="alice", **app_kwargs)
    return TestClient(app), store, session, source


def cid() -> str:
    return uuid.uuid4().hex


def judgment(item_id, choice="a", annotator="alice", client_id=None):
    return {"client_id": client_id or cid(), "item_id": item_id, "annotator": annotator, "choice": choice}


def test_page_static_files_and_config(tmp_path):
    client, *_ = make(tmp_path)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js"' in page.text and "cdn" not in page.text.lower()
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp  # no inline or foreign scripts
    assert page.headers["x-content-type-options"] == "nosniff"
    for asset in ("/static/app.js", "/static/app.css"):
        assert client.get(asset).status_code == 200
    js = client.get("/static/app.js").text
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js  # output goes in as text only
    config = client.get("/api/config").json()
    assert config["annotator"] == "alice" and config["total"] == len(PROMPTS)
    assert [s["name"] for s in config["systems"]] == ["1", "2"]


def test_next_item_is_blind_and_generated_once(tmp_path):
    client, store, session, source = make(tmp_path)
    r = client.get("/api/next", params={"annotator": "alice"})
    assert r.status_code == 200
    item = r.json()["item"]
    assert item["prompt"] == PROMPTS[0] and item["index"] == 0
    assert {item["response_a"], item["response_b"]} == {
        " first answer to User: What is 2 + 3?",
        " second answer to User: What is 2 + 3?",
    }
    assert not any("system" in k for k in item)  # which system wrote which side is not shown
    assert r.json()["stats"] == {**r.json()["stats"], "labeled": 0, "remaining": len(PROMPTS), "total": len(PROMPTS)}
    # asked again (another annotator): the stored item, not a new generation
    again = client.get("/api/next", params={"annotator": "bob"}).json()["item"]
    assert again["response_a"] == item["response_a"] and source.calls == 1
    stored = store.get_item(item["id"])
    assert stored.rendered_prompt == TEMPLATE.format(prompt=PROMPTS[0])
    assert {stored.system_a["name"], stored.system_b["name"]} == {"1", "2"}


def test_judgment_is_stored_once_and_the_queue_moves_on(tmp_path):
    client, store, session, _ = make(tmp_path)
    first = client.get("/api/next", params={"annotator": "alice"}).json()["item"]
    body = judgment(first["id"], "b")
    r = client.post("/api/judgments", json=body)
    assert r.status_code == 201 and r.json()["replayed"] is False
    assert r.json()["stats"]["labeled"] == 1 and r.json()["stats"]["remaining"] == len(PROMPTS) - 1
    # the same submission again (a retry): acknowledged, stored once
    replay = client.post("/api/judgments", json=body)
    assert replay.status_code == 200 and replay.json()["replayed"] is True
    assert replay.json()["judgment"]["id"] == r.json()["judgment"]["id"]
    # another submission for an item already judged by alice: refused
    double = client.post("/api/judgments", json=judgment(first["id"], "a"))
    assert double.status_code == 409 and "already judged" in double.json()["error"]
    # a client id reused for something else: refused
    reused = client.post("/api/judgments", json={**body, "choice": "tie"})
    assert reused.status_code == 409 and "client_id" in reused.json()["error"]
    assert store.counts()["judgments"] == 1
    row = sqlite3.connect(store.path).execute("SELECT item_id, annotator, choice FROM judgments").fetchall()
    assert row == [(first["id"], "alice", "b")]
    nxt = client.get("/api/next", params={"annotator": "alice"}).json()["item"]
    assert nxt["id"] != first["id"]
    # bob has not judged it: he still gets it, and his judgment is a second row
    assert client.get("/api/next", params={"annotator": "bob"}).json()["item"]["id"] == first["id"]
    assert client.post("/api/judgments", json=judgment(first["id"], "a", "bob")).status_code == 201
    stats = client.get("/api/stats", params={"annotator": "alice"}).json()
    assert stats["judgments"] == 2 and stats["annotators"] == {"alice": 1, "bob": 1}
    assert stats["agreement"]["items_multi"] == 1 and stats["agreement"]["percent"] == 0.0


BAD_BODIES = [
    ("malformed JSON", b'{"client_id": "abcdefgh12", "item_id": ', "application/json", 422, "malformed JSON"),
    ("not an object", b"[1, 2]", "application/json", 422, "invalid request"),
    ("form post (no JSON)", b"choice=a", "application/x-www-form-urlencoded", 422, "invalid request"),
    ("text/plain JSON", json.dumps(judgment("x" * 24)).encode(), "text/plain", 422, "invalid request"),
]


@pytest.mark.parametrize("name,raw,ctype,status,fragment", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_malformed_bodies_are_refused_with_a_message(tmp_path, name, raw, ctype, status, fragment):
    client, store, *_ = make(tmp_path)
    for path in ("/api/judgments", "/api/ratings"):
        r = client.post(path, content=raw, headers={"content-type": ctype})
        assert r.status_code == status and fragment in r.json()["error"]
    assert store.counts()["judgments"] == store.counts()["ratings"] == 0


def test_invalid_fields_and_unknown_ids_write_nothing(tmp_path):
    client, store, *_ = make(tmp_path)
    item = client.get("/api/next", params={"annotator": "alice"}).json()["item"]
    ok = judgment(item["id"])
    cases = [
        ({**ok, "choice": "c"}, 422, "choice"),
        ({**ok, "client_id": "short"}, 422, "client_id"),
        ({**ok, "annotator": ""}, 422, "annotator"),
        ({**ok, "annotator": "eve\n"}, 422, "annotator"),
        ({**ok, "surprise": 1}, 422, "surprise"),
        ({k: v for k, v in ok.items() if k != "item_id"}, 422, "item_id"),
        ({**ok, "item_id": "0123456789abcdef01234567"}, 404, "unknown item_id"),
        ({**ok, "item_id": "'; DROP TABLE judgments; --"}, 404, "unknown item_id"),
    ]
    for body, status, fragment in cases:
        r = client.post("/api/judgments", json=body)
        assert r.status_code == status, body
        assert fragment in r.json()["error"], r.json()
    rating = {"client_id": cid(), "item_id": item["id"], "annotator": "alice", "side": "a", "thumb": "up"}
    for body, status in (
        ({**rating, "side": "c"}, 422),
        ({**rating, "thumb": "sideways"}, 422),
        ({**rating, "thumb": 1}, 422),
        ({**rating, "item_id": "nope-nope-nope"}, 404),
    ):
        assert client.post("/api/ratings", json=body).status_code == status
    assert client.get("/api/items/nope-nope-nope", params={"annotator": "alice"}).status_code == 404
    assert "unknown item_id" in client.get("/api/next", params={"annotator": "alice", "after": "nope"}).json()["error"]
    assert client.get("/api/next").status_code == 422  # no annotator
    assert client.get("/api/stats", params={"annotator": "a\x00b"}).status_code == 422
    assert store.counts()["judgments"] == store.counts()["ratings"] == 0
    assert sqlite3.connect(store.path).execute("SELECT COUNT(*) FROM judgments").fetchone()[0] == 0


def test_ratings_are_events_and_the_latest_counts(tmp_path):
    client, store, *_ = make(tmp_path)
    item = client.get("/api/next", params={"annotator": "alice"}).json()["item"]
    up = {"client_id": cid(), "item_id": item["id"], "annotator": "alice", "side": "a", "thumb": "up"}
    assert client.post("/api/ratings", json=up).status_code == 201
    assert client.post("/api/ratings", json=up).status_code == 200  # retry: stored once
    down = {**up, "client_id": cid(), "thumb": "down", "comment": "wrong: 2 + 3 is 5"}
    assert client.post("/api/ratings", json=down).status_code == 201
    assert client.post("/api/ratings", json={**up, "client_id": cid(), "side": "b"}).status_code == 201
    got = client.get(f"/api/items/{item['id']}", params={"annotator": "alice"}).json()["item"]
    assert got["ratings"] == {
        "a": {"thumb": "down", "comment": "wrong: 2 + 3 is 5"},
        "b": {"thumb": "up", "comment": None},
    }
    assert got["judgment"] is None
    assert store.counts()["ratings"] == 3
    stats = client.get("/api/stats", params={"annotator": "alice"}).json()
    assert stats["thumbs"] == {"up": 1, "down": 1}


def test_skip_wraps_around_and_the_queue_ends(tmp_path):
    client, *_ = make(tmp_path)
    ids = []
    after = None
    for _ in PROMPTS:
        item = client.get("/api/next", params={"annotator": "alice", "after": after}).json()["item"]
        ids.append(item["id"])
        after = item["id"]
    assert len(set(ids)) == len(PROMPTS)
    wrapped = client.get("/api/next", params={"annotator": "alice", "after": ids[-1]}).json()["item"]
    assert wrapped["id"] == ids[0]
    for item_id in ids:
        assert client.post("/api/judgments", json=judgment(item_id, "tie")).status_code == 201
    end = client.get("/api/next", params={"annotator": "alice"}).json()
    assert end["item"] is None and end["stats"]["remaining"] == 0 and end["stats"]["labeled"] == len(PROMPTS)


def test_restarted_session_continues_where_it_stopped(tmp_path):
    client, store, session, source = make(tmp_path)
    served = []
    for choice in ("a", "b"):
        item = client.get("/api/next", params={"annotator": "alice"}).json()["item"]
        client.post("/api/judgments", json=judgment(item["id"], choice))
        served.append(item)
    # a new server process: same database, same prompts and systems -> same item ids
    fresh_source = FakeSource()
    client2, store2, session2, _ = make(tmp_path, source=fresh_source)
    assert session2.ids == session.ids
    nxt = client2.get("/api/next", params={"annotator": "alice"}).json()
    assert nxt["item"]["id"] not in {s["id"] for s in served}
    assert nxt["stats"]["labeled"] == 2 and nxt["stats"]["remaining"] == len(PROMPTS) - 2
    # items generated before the restart are read back, not generated again
    assert client2.get(f"/api/items/{served[0]['id']}", params={"annotator": "alice"}).json()["item"]["judgment"] == "a"
    assert all(TEMPLATE.format(prompt=s["prompt"]) not in fresh_source.generated for s in served)


def test_other_hosts_need_a_token_and_every_call_checks_it(tmp_path):
    with pytest.raises(UsageError, match="token"):
        check_access("0.0.0.0", None)
    with pytest.raises(UsageError, match="at least 16"):
        check_access("0.0.0.0", "short")
    assert check_access("127.0.0.1", None) is None
    assert len(check_access("0.0.0.0", "auto")) >= 16
    token = "s3cret-token-0123456789"
    client, store, *_ = make(tmp_path, token=token)
    for path in ("/", "/static/app.js", "/api/config", "/api/stats?annotator=alice"):
        assert client.get(path).status_code == 401
    r = client.post("/api/judgments", json=judgment("x" * 24))
    assert r.status_code == 401 and "token" in r.json()["error"]
    assert client.get("/api/config", headers={"X-Lmforge-Token": token + "x"}).status_code == 401
    assert client.get("/api/config", headers={"X-Lmforge-Token": token}).status_code == 200
    assert client.get("/api/config", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert client.get("/", params={"token": "wrong"}, follow_redirects=False).status_code == 401
    login = client.get("/", params={"token": token}, follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/"
    assert (
        "httponly" in login.headers["set-cookie"].lower() and "samesite=strict" in login.headers["set-cookie"].lower()
    )
    # the cookie now rides along (TestClient keeps cookies): the page and the API work
    assert client.get("/").status_code == 200
    item = client.get("/api/next", params={"annotator": "alice"}).json()["item"]
    assert client.post("/api/judgments", json=judgment(item["id"])).status_code == 201


def test_loopback_server_refuses_foreign_host_names(tmp_path):
    client, *_ = make(tmp_path, allowed_hosts=["127.0.0.1", "localhost", "::1"])
    assert client.get("/api/config", headers={"host": "evil.example:8000"}).status_code == 400
    assert client.get("/api/config", headers={"host": "localhost:8000"}).status_code == 200
    assert client.get("/api/config", headers={"host": "[::1]:8000"}).status_code == 200


def test_default_database_lives_in_the_checkpoints_run_dir(tmp_path):
    assert default_db(tmp_path / "run" / "checkpoints" / "last.ckpt") == (tmp_path / "run" / "feedback.db").resolve()
    assert default_db(tmp_path / "model.ckpt") == (tmp_path / "feedback.db").resolve()


def test_parallel_submissions_never_lose_or_duplicate(tmp_path):
    """Real HTTP against uvicorn's thread pool: racing retries, racing double judgments, and
    many annotators labeling everything at once."""
    import httpx

    prompts = [f"Question number {i}?" for i in range(12)]
    store = Store(tmp_path / "feedback.db")
    session = FeedbackSession(store, prompts, FakeSource(), template=TEMPLATE, background=False)
    session.ensure(range(len(prompts)))
    app = create_app(session, annotator="alice")
    with ThreadServer(app) as server, ThreadPoolExecutor(16) as pool:

        def post(body):
            with httpx.Client(base_url=server.url, timeout=30) as c:
                return c.post("/api/judgments", json=body).status_code

        first = session.ids[0]
        # 1. one submission retried 8 times at once: stored once, every answer a success
        body = judgment(first, "a", "alice")
        barrier = threading.Barrier(8)

        def retry(_):
            barrier.wait()
            return post(body)

        codes = list(pool.map(retry, range(8)))
        assert sorted(codes) == [200] * 7 + [201]
        # 2. eight different submissions for one (item, annotator): exactly one wins
        barrier2 = threading.Barrier(8)

        def rival(choice):
            barrier2.wait()
            return post(judgment(session.ids[1], choice, "bob"))

        codes = list(pool.map(rival, ["a", "b", "tie", "both_bad"] * 2))
        assert sorted(codes) == [201] + [409] * 7
        # 3. six annotators label all 12 items concurrently (72 judgments)
        jobs = [judgment(i, "a", f"ann{k}") for k in range(6) for i in session.ids]
        codes = list(pool.map(post, jobs))
        assert codes.count(201) == len(jobs)
    con = sqlite3.connect(store.path)
    assert con.execute("SELECT COUNT(*) FROM judgments").fetchone()[0] == 1 + 1 + len(jobs)
    dups = con.execute(
        "SELECT COUNT(*) FROM (SELECT item_id, annotator FROM judgments"
        " GROUP BY item_id, annotator HAVING COUNT(*) > 1)"
    ).fetchone()[0]
    assert dups == 0
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
