// lmforge feedback page. Model output and prompts are only ever set with textContent:
// whatever they contain is shown as text, never parsed as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SIDES = ["a", "b"];
  const state = {
    annotator: "",
    item: null,
    busy: false,
    active: "a",
    ratings: { a: { thumb: null, comment: "" }, b: { thumb: null, comment: "" } },
  };

  function uuid() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const bytes = crypto.getRandomValues(new Uint8Array(16)); // also on plain http (non-secure) pages
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function status(text, kind) {
    const el = $("status");
    el.textContent = text || "";
    el.className = kind || "";
  }

  // One request; retried on network failures with the same body (and so the same client_id:
  // the server recognises a retry and stores the judgment once).
  async function api(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let lastError = null;
    for (let attempt = 0; attempt < 5; attempt++) {
      try {
        const res = await fetch(path, init);
        let data = null;
        try { data = await res.json(); } catch (e) { data = null; }
        return { ok: res.ok, status: res.status, data: data || {} };
      } catch (e) {
        lastError = e;
        status("connection lost, retrying…", "warn");
        await new Promise((r) => setTimeout(r, 250 * 2 ** attempt));
      }
    }
    throw lastError;
  }

  function query(params) {
    return Object.entries(params)
      .filter(([, v]) => v !== null && v !== undefined)
      .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`)
      .join("&");
  }

  // ------------------------------------------------------------------ rendering
  function setText(id, text) {
    const el = $(id);
    el.textContent = text;
    el.classList.toggle("empty", !text.trim());
  }

  function showItem(item) {
    state.item = item;
    const work = $("work");
    if (!item) {
      work.hidden = true;
      $("done").hidden = false;
      return;
    }
    work.hidden = false;
    $("done").hidden = true;
    setText("prompt", item.prompt);
    setText("response-a", item.response_a);
    setText("response-b", item.response_b);
    $("item-pos").textContent = `#${item.index + 1}`;
    for (const side of SIDES) {
      const r = (item.ratings && item.ratings[side]) || {};
      state.ratings[side] = { thumb: r.thumb || null, comment: r.comment || "" };
      $(`comment-${side}`).value = state.ratings[side].comment;
    }
    setActive("a");
    renderThumbs();
  }

  function renderThumbs() {
    document.querySelectorAll("button.thumb").forEach((btn) => {
      const on = state.ratings[btn.dataset.side].thumb === btn.dataset.thumb;
      btn.setAttribute("aria-pressed", on ? "true" : "false");
    });
  }

  function setActive(side) {
    state.active = side;
    for (const s of SIDES) $(`card-${s}`).classList.toggle("active", s === side);
  }

  function pct(x) {
    return x === null || x === undefined ? "–" : `${(100 * x).toFixed(0)}%`;
  }

  function showStats(s) {
    if (!s) return;
    const p = $("progress");
    p.textContent = `${s.labeled} labeled · ${s.remaining} remaining`;
    p.dataset.labeled = String(s.labeled);
    p.dataset.remaining = String(s.remaining);
    $("progress-bar").style.width = s.total ? `${(100 * s.labeled) / s.total}%` : "0%";
    $("stat-judgments").textContent = String(s.judgments);
    const names = Object.entries(s.annotators).map(([n, c]) => `${n} (${c})`);
    $("stat-annotators").textContent = names.length ? names.join(", ") : "–";
    const c = s.choices;
    $("stat-choices").textContent = `${c.a} / ${c.b} / ${c.tie} / ${c.both_bad}`;
    $("stat-thumbs").textContent = `${s.thumbs.up} / ${s.thumbs.down}`;
    const a = s.agreement;
    $("stat-agreement").textContent = a.items_multi
      ? `${pct(a.percent)} of ${a.pairs} pairs on ${a.items_multi} items · α = ${a.krippendorff_alpha === null ? "–" : a.krippendorff_alpha.toFixed(2)}`
      : "no item has two annotators yet";
    const body = document.querySelector("#winrates tbody");
    body.replaceChildren();
    for (const [name, w] of Object.entries(s.win_rates)) {
      const tr = document.createElement("tr");
      for (const v of [name, w.wins, w.losses, w.ties, w.both_bad, pct(w.win_rate)]) {
        const td = document.createElement("td");
        td.textContent = String(v);
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
  }

  // ------------------------------------------------------------------- actions
  async function load(after) {
    const res = await api("GET", `/api/next?${query({ annotator: state.annotator, after })}`);
    if (!res.ok) {
      status(res.data.error || `error ${res.status}`, "error");
      return;
    }
    showItem(res.data.item);
    showStats(res.data.stats);
  }

  async function sendRating(side) {
    const item = state.item;
    if (!item) return;
    const r = state.ratings[side];
    const res = await api("POST", "/api/ratings", {
      client_id: uuid(), item_id: item.id, annotator: state.annotator, side,
      thumb: r.thumb, comment: r.comment || null,
    });
    if (!res.ok) {
      status(res.data.error || `error ${res.status}`, "error");
      return;
    }
    const stats = await api("GET", `/api/stats?${query({ annotator: state.annotator })}`);
    if (stats.ok) showStats(stats.data);
  }

  async function flushComments() {
    for (const side of SIDES) {
      const r = state.ratings[side];
      const typed = $(`comment-${side}`).value;
      if (typed !== r.comment) {
        r.comment = typed;
        await sendRating(side);
      }
    }
  }

  async function thumb(value) {
    if (!state.item || state.busy) return;
    const r = state.ratings[state.active];
    r.thumb = r.thumb === value ? null : value; // pressing again takes it back
    r.comment = $(`comment-${state.active}`).value;
    renderThumbs();
    await sendRating(state.active);
  }

  async function choose(choice) {
    const item = state.item;
    if (!item || state.busy) return;
    state.busy = true;
    document.body.classList.add("busy");
    try {
      await flushComments();
      const res = await api("POST", "/api/judgments", {
        client_id: uuid(), item_id: item.id, annotator: state.annotator, choice,
      });
      // the next item comes with fresh statistics: the counter moves when it is on screen
      if (res.ok || res.status === 409) await load(item.id);
      if (res.ok) {
        status(`saved: ${choice === "both_bad" ? "both bad" : choice === "tie" ? "tie" : choice.toUpperCase() + " is better"}`, "ok");
      } else {
        status(res.data.error || `error ${res.status}`, "error");
      }
    } catch (e) {
      status(`not saved (${e}); press the key again`, "error");
    } finally {
      state.busy = false;
      document.body.classList.remove("busy");
    }
  }

  async function skip() {
    if (!state.item || state.busy) return;
    state.busy = true;
    try {
      await flushComments();
      await load(state.item.id);
      status("skipped", "");
    } finally {
      state.busy = false;
    }
  }

  const KEYS = {
    "1": () => choose("a"), a: () => choose("a"),
    "2": () => choose("b"), b: () => choose("b"),
    "3": () => choose("tie"), t: () => choose("tie"),
    "4": () => choose("both_bad"), x: () => choose("both_bad"),
    u: () => thumb("up"), d: () => thumb("down"),
    n: () => skip(),
    ArrowLeft: () => setActive("a"), h: () => setActive("a"),
    ArrowRight: () => setActive("b"), l: () => setActive("b"),
    c: () => $(`comment-${state.active}`).focus(),
  };

  function onKey(e) {
    const t = e.target;
    if (t && (t.tagName === "TEXTAREA" || t.tagName === "INPUT")) {
      if (e.key === "Escape" || (e.key === "Enter" && (e.ctrlKey || e.metaKey))) t.blur();
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const action = KEYS[e.key];
    if (action) {
      e.preventDefault();
      action();
    }
  }

  async function init() {
    const params = new URLSearchParams(location.search);
    const cfg = await api("GET", "/api/config");
    if (!cfg.ok) {
      status(cfg.data.error || `error ${cfg.status}`, "error");
      return;
    }
    state.annotator = params.get("annotator") || localStorage.getItem("lmforge.annotator") || cfg.data.annotator;
    const who = $("annotator");
    who.value = state.annotator;
    who.addEventListener("change", () => {
      const name = who.value.trim();
      if (!name) { who.value = state.annotator; return; }
      state.annotator = name;
      localStorage.setItem("lmforge.annotator", name);
      load(null);
    });
    const systems = $("systems");
    for (const s of cfg.data.systems || []) {
      const li = document.createElement("li");
      li.textContent = `${s.name}: ${s.description}`;
      systems.appendChild(li);
    }
    document.querySelectorAll("button.choice").forEach((b) => b.addEventListener("click", () => choose(b.dataset.choice)));
    document.querySelectorAll("button.thumb").forEach((b) => b.addEventListener("click", () => {
      setActive(b.dataset.side);
      thumb(b.dataset.thumb);
    }));
    for (const side of SIDES) {
      const ta = $(`comment-${side}`);
      ta.addEventListener("focus", () => setActive(side));
      ta.addEventListener("blur", () => {
        if (state.item && ta.value !== state.ratings[side].comment) {
          state.ratings[side].comment = ta.value;
          sendRating(side);
        }
      });
      $(`card-${side}`).addEventListener("click", () => setActive(side));
    }
    $("skip").addEventListener("click", () => skip());
    document.addEventListener("keydown", onKey);
    await load(null);
    document.body.dataset.ready = "true";
  }

  init().catch((e) => status(`failed to start: ${e}`, "error"));
})();
