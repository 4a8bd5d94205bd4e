"""Progress, agreement and win-rate statistics of a feedback database.

* progress: items of this session labeled by the annotator, and remaining;
* agreement, over items judged by more than one annotator: the share of annotator pairs that
  chose the same answer (a / b / tie / both bad), and Krippendorff's alpha (nominal), which
  corrects that share for agreement by chance and allows any number of annotators per item;
* win rates: each system (checkpoint + sampling settings) against the other, from the
  judgments that picked a side; ties and both-bad are counted apart.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations
from typing import Iterable

from lmforge.data.feedback_store import CHOICES, Store


def krippendorff_alpha_nominal(units: Iterable[list[str]]) -> float | None:
    """Krippendorff's alpha for nominal labels; units: the labels each item received. Items with
    fewer than two labels carry no agreement information. None when undefined (no item with two
    labels, or every label the same category)."""
    coincidence: Counter = Counter()
    for labels in units:
        m = len(labels)
        if m < 2:
            continue
        for i, c in enumerate(labels):
            for j, k in enumerate(labels):
                if i != j:
                    coincidence[(c, k)] += 1.0 / (m - 1)
    n_c: Counter = Counter()
    for (c, _), v in coincidence.items():
        n_c[c] += v
    n = sum(n_c.values())
    if n <= 1:
        return None
    observed = sum(v for (c, k), v in coincidence.items() if c != k)
    expected = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k) / (n - 1)
    if expected == 0:
        return None
    return 1.0 - observed / expected


def agreement(judgments: list[dict]) -> dict:
    by_item: dict[str, list[str]] = defaultdict(list)
    for j in judgments:
        by_item[j["item_id"]].append(j["choice"])
    multi = [labels for labels in by_item.values() if len(labels) > 1]
    pairs = [(x, y) for labels in multi for x, y in combinations(labels, 2)]
    alpha = krippendorff_alpha_nominal(multi)
    return {
        "items_multi": len(multi),
        "pairs": len(pairs),
        "percent": (sum(x == y for x, y in pairs) / len(pairs)) if pairs else None,
        "krippendorff_alpha": alpha,
    }


def win_rates(judgments: list[dict], items: dict) -> dict[str, dict]:
    """Per system name: wins, losses, ties, both_bad, win_rate (wins / decisive judgments)."""
    table: dict[str, Counter] = defaultdict(Counter)
    for j in judgments:
        item = items.get(j["item_id"])
        if item is None:
            continue
        a, b = item.system_a.get("name", "a"), item.system_b.get("name", "b")
        choice = j["choice"]
        if choice == "a":
            table[a]["wins"] += 1
            table[b]["losses"] += 1
        elif choice == "b":
            table[b]["wins"] += 1
            table[a]["losses"] += 1
        else:
            for s in (a, b):
                table[s]["ties" if choice == "tie" else "both_bad"] += 1
    out = {}
    for name in sorted(table):
        c = table[name]
        decisive = c["wins"] + c["losses"]
        out[name] = {
            "wins": c["wins"],
            "losses": c["losses"],
            "ties": c["ties"],
            "both_bad": c["both_bad"],
            "win_rate": c["wins"] / decisive if decisive else None,
        }
    return out


def compute_stats(store: Store, queue_ids: list[str], annotator: str, items: dict | None = None) -> dict:
    """Statistics of this session's items (queue_ids) for one annotator."""
    queue = set(queue_ids)
    judgments = store.judgments(queue)
    mine = sum(1 for j in judgments if j["annotator"] == annotator)
    if items is None:
        items = {i.id: i for i in store.items() if i.id in queue}
    ratings = [r for r in store.current_ratings() if r["item_id"] in queue]
    return {
        "annotator": annotator,
        "labeled": mine,
        "remaining": len(queue) - mine,
        "total": len(queue),
        "judgments": len(judgments),
        "annotators": dict(Counter(j["annotator"] for j in judgments)),
        "choices": {c: sum(1 for j in judgments if j["choice"] == c) for c in CHOICES},
        "thumbs": {
            "up": sum(1 for r in ratings if r["thumb"] == 1),
            "down": sum(1 for r in ratings if r["thumb"] == -1),
        },
        "agreement": agreement(judgments),
        "win_rates": win_rates(judgments, items),
    }
