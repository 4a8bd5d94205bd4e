"""The feedback server as people run it: `python -m lmforge.feedback serve` killed with SIGKILL in
the middle of labeling and restarted, and the page in a real headless Chromium."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the feedback app needs the `feedback` extra (fastapi, uvicorn)")
httpx = pytest.importorskip("httpx", reason="the server tests talk HTTP with httpx")

from feedback_fixtures import ROOT, FakeSource, ThreadServer, ckpts, free_port  # noqa: E402,F401

from lmforge.data.feedback_store import Store  # noqa: E402
from lmforge.feedback.app import FeedbackSession, create_app  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def start_server(ckpt: Path, prompts: Path, db: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "lmforge.feedback",
        "serve",
        f"ckpt={ckpt}",
        f"prompts={prompts}",
        f"db={db}",
        f"port={port}",
        "max_new_tokens=8",
        "prefetch=2",
        "annotator=alice",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/config", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server did not answer within 240 s:\n{log.read_text()}")


@pytest.mark.slow
def test_sigkill_mid_session_loses_nothing_and_restart_continues(ckpts, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"What is {i} + {i + 1}?\n" for i in range(40)))
    db, log = tmp_path / "feedback.db", tmp_path / "server.log"
    port = free_port()
    proc = start_server(ckpts["lm"], prompts, db, port, log)
    attempts: list[dict] = []  # every submission sent, acknowledged or not
    acked: set[str] = set()
    stop = threading.Event()

    def label() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            while not stop.is_set():
                try:
                    item = c.get("/api/next", params={"annotator": "alice"}).json()["item"]
                    body = {
                        "client_id": uuid.uuid4().hex,
                        "item_id": item["id"],
                        "annotator": "alice",
                        "choice": ["a", "b", "tie", "both_bad"][len(attempts) % 4],
                    }
                    attempts.append(body)
                    if c.post("/api/judgments", json=body).status_code == 201:
                        acked.add(body["client_id"])
                except (httpx.HTTPError, ValueError):
                    return  # the server is gone

    worker = threading.Thread(target=label)
    worker.start()
    deadline = time.time() + 120
    while len(acked) < 6 and time.time() < deadline and worker.is_alive():
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no shutdown handler runs
    proc.wait()
    stop.set()
    worker.join(timeout=30)
    assert len(acked) >= 6, log.read_text()

    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {r[0] for r in con.execute("SELECT client_id FROM judgments")}
    assert acked <= stored  # every acknowledged judgment survived the kill
    labeled = {r[0] for r in con.execute("SELECT item_id FROM judgments WHERE annotator = 'alice'")}
    con.close()

    port2 = free_port()
    proc = start_server(ckpts["lm"], prompts, db, port2, log)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port2}", timeout=30) as c:
            nxt = c.get("/api/next", params={"annotator": "alice"}).json()
            assert nxt["item"]["id"] not in labeled  # labeled items are not served again
            assert nxt["stats"]["labeled"] == len(labeled)
            # the page retries what it never heard back about, with the same client ids
            for body in attempts:
                r = c.post("/api/judgments", json=body)
                assert r.status_code in (200, 201), r.text
                assert r.status_code == (200 if body["client_id"] in stored else 201)
            # items made before the kill are served from the database, unchanged
            item = c.get(f"/api/items/{attempts[0]['item_id']}", params={"annotator": "alice"}).json()["item"]
            assert item["judgment"] == attempts[0]["choice"]
    finally:
        proc.kill()
        proc.wait()
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM judgments").fetchone()[0] == len(attempts)
    assert con.execute("SELECT COUNT(DISTINCT client_id) FROM judgments").fetchone()[0] == len(attempts)


XSS_PROMPT = 'Is this safe? <script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'


@pytest.mark.slow
def test_label_with_the_keyboard_in_headless_chromium(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs `pip install playwright`")

    store = Store(tmp_path / "feedback.db")
    prompts = [XSS_PROMPT, "What is 2 + 3?", "Reverse the word cat."]
    session = FeedbackSession(store, prompts, FakeSource(), template="User: {prompt}\nAssistant:", prefetch=2)
    app = create_app(session, annotator="alice", allowed_hosts=["127.0.0.1", "localhost"])
    with ThreadServer(app) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            dialogs, errors = [], []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_selector("body[data-ready=true]", timeout=30_000)
            expect = sync_api.expect
            progress = page.locator("#progress")
            assert progress.text_content() == "0 labeled · 3 remaining"

            # the prompt and the responses carry markup: it is shown as text, never run
            assert page.locator("#prompt").text_content() == XSS_PROMPT
            assert XSS_PROMPT in page.locator("#response-a").text_content()
            assert page.locator("main img, main script").count() == 0
            assert page.evaluate("window.__xss") is None and not dialogs

            first_id = page.evaluate("fetch('/api/next?annotator=alice').then(r => r.json()).then(j => j.item.id)")
            shown_a = page.locator("#response-a").text_content()
            page.keyboard.press("ArrowRight")  # pick B, thumbs it down, then says A is better
            page.keyboard.press("d")
            # (locator assertions, not wait_for_function: the page's CSP forbids eval)
            expect(page.locator("#card-b .thumb.down")).to_have_attribute("aria-pressed", "true")
            page.keyboard.press("1")
            expect(progress).to_have_attribute("data-labeled", "1", timeout=30_000)
            expect(progress).to_have_text("1 labeled · 2 remaining")
            assert page.locator("#prompt").text_content() == "What is 2 + 3?"  # the next item
            expect(page.locator("#status")).to_have_text("saved: A is better")
            assert not errors and page.evaluate("window.__xss") is None
        finally:
            browser.close()
            session.close()

    con = sqlite3.connect(store.path)
    rows = con.execute(
        "SELECT j.item_id, j.annotator, j.choice, i.prompt, i.response_a FROM judgments j"
        " JOIN items i ON i.id = j.item_id"
    ).fetchall()
    assert rows == [(first_id, "alice", "a", XSS_PROMPT, shown_a)]
    assert con.execute("SELECT side, thumb, annotator FROM ratings").fetchall() == [("b", -1, "alice")]
    if os.environ.get("LMFORGE_KEEP_BROWSER_DB"):
        shutil.copy(store.path, os.environ["LMFORGE_KEEP_BROWSER_DB"])
