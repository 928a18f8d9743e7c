"""History: bounded lists of releases and scaling decisions, and finding a release in it."""

from __future__ import annotations

import json

from agent.history import LIMIT, append, find_release, read_history
from agent.keys import Keys


def test_history_is_bounded_and_finds_releases(embedded_store):
    keys = Keys("/shipmate/rel")
    for n in range(LIMIT + 5):
        assert append(embedded_store, keys, "web", "releases", {"version": f"v{n:04d}"})
    got = read_history(embedded_store, keys, "web")["releases"]
    assert len(got) == LIMIT and got[-1]["version"] == f"v{LIMIT + 4:04d}"
    embedded_store.put(keys.service("web", "release"), json.dumps({"version": "v0024"}))
    assert find_release(embedded_store, keys, "web", None)["version"] == "v0023"
    assert find_release(embedded_store, keys, "web", "v0010")["version"] == "v0010"
    assert find_release(embedded_store, keys, "web", "nope") is None
