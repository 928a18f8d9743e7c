"""The store contract (agent/store/base.py), run against every backend.

``embedded`` uses a SQLite file in tmp_path; ``etcd`` (v3 API) and ``etcd2`` (v2 API)
use the session's real etcd (the ``etcd`` fixture in tests/conftest.py). Every test
works under its own key prefix, so tests never see each other's keys.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.store import Entry, Store, StoreError, WatchEvent
from agent.store.embedded import EmbeddedStore
from tests.helpers import observation_window
from tests.services import Etcd, free_port

ROOT = Path(__file__).resolve().parents[3]
BACKENDS = ["embedded", "etcd", "etcd2"]
ETCD_BACKENDS = ["etcd", "etcd2"]
TTL = 1  # etcd silently raises a lease TTL to its minimum (1 s here, 2 s with default timings)
EXPIRY = TTL + 3.0  # generous: etcd checks expiry every 500 ms, v2 every sync


# -- helpers ---------------------------------------------------------------


def wait_for(check: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``check`` until it is truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(0.02)


class Recorder:
    """A watch callback that records every call, thread-safely."""

    def __init__(self) -> None:
        self.calls: list[list[WatchEvent]] = []
        self._cond = threading.Condition()

    def __call__(self, events: list[WatchEvent]) -> None:
        with self._cond:
            self.calls.append(list(events))
            self._cond.notify_all()

    @property
    def events(self) -> list[WatchEvent]:
        with self._cond:
            return [event for call in self.calls for event in call]

    @property
    def resyncs(self) -> int:
        with self._cond:
            return sum(1 for call in self.calls if not call)

    def wait(self, check: Callable[[], bool], timeout: float = 1.0) -> bool:
        with self._cond:
            return self._cond.wait_for(check, timeout)

    def wait_event(self, event: WatchEvent, timeout: float = 1.0) -> None:
        if not self.wait(lambda: event in self.events, timeout):
            pytest.fail(f"watch did not see {event} within {timeout}s; saw {self.calls}")


PAGE = 50  # keys per page of an etcd v3 prefix read here (a test reads more than one page)


def open_backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A fresh store of ``kind`` (etcd backends need the ``etcd`` fixture)."""
    if kind == "embedded":
        return EmbeddedStore(tmp_path / "state.db")
    etcd = request.getfixturevalue("etcd")
    if kind == "etcd":
        from agent.store.etcd3 import Etcd3Store

        return Etcd3Store([etcd.endpoint], timeout=5.0, page_size=PAGE)
    from agent.store.etcd2 import Etcd2Store

    return Etcd2Store([etcd.endpoint], timeout=5.0)


# -- fixtures --------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend under test."""
    return request.param


@pytest.fixture
def make_store(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], Store]]:
    """Factory of stores on the same backend (and the same file or etcd); closed at the end."""
    opened: list[Store] = []

    def make() -> Store:
        store = open_backend(backend, request, tmp_path)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: Callable[[], Store]) -> Store:
    """A store on the backend under test."""
    return make_store()


@pytest.fixture
def prefix(backend: str) -> str:
    """A key prefix no other test uses."""
    return f"/shipmate-test/{backend}/{uuid.uuid4().hex[:12]}/"


# -- reads and writes ------------------------------------------------------


def test_get_absent_and_present(store: Store, prefix: str) -> None:
    assert store.get(prefix + "missing") is None
    revision = store.put(prefix + "k", "v1")
    entry = store.get(prefix + "k")
    assert entry is not None
    assert (entry.key, entry.value, entry.revision) == (prefix + "k", "v1", revision)


def test_values_and_keys_round_trip_unchanged(store: Store, prefix: str) -> None:
    for i, value in enumerate(["", "3", '{"image": "web:1.4", "by": "ops"}', "é ☃ 日本", " a\nb "]):
        store.put(f"{prefix}k{i}", value)
        assert store.get(f"{prefix}k{i}").value == value  # type: ignore[union-attr]
    odd = prefix + "odd key?#%20é"
    store.put(odd, "v")
    assert store.get(odd).value == "v"  # type: ignore[union-attr]
    assert odd in store.get_prefix(prefix)
    assert store.delete(odd) is True


def test_get_prefix_returns_exactly_the_keys_under_it(store: Store, prefix: str) -> None:
    inside = {prefix + "a": "1", prefix + "b/c": "2", prefix + "b/d/e": "3"}
    for key, value in inside.items():
        store.put(key, value)
    store.put(prefix[:-1] + "X/sibling", "no")  # "prefixX/...": not under "prefix/"
    entries = store.get_prefix(prefix)
    assert {key: entry.value for key, entry in entries.items()} == inside
    assert all(entry.key == key for key, entry in entries.items())
    assert store.get_prefix(prefix + "nothing/") == {}
    assert store.get_prefix(prefix + "nothing-here") == {}


def test_get_prefix_that_is_not_a_directory(store: Store, prefix: str) -> None:
    for name in ("service", "server/x", "other", "serving/a/b"):
        store.put(prefix + name, name)
    found = store.get_prefix(prefix + "ser")
    assert sorted(found) == [prefix + "server/x", prefix + "service", prefix + "serving/a/b"]


def test_get_prefix_is_one_request(store: Store, prefix: str) -> None:
    for i in range(5):
        store.put(f"{prefix}n/{i}", str(i))
    before = store.round_trips
    assert len(store.get_prefix(prefix)) == 5
    assert store.round_trips == before + 1


def test_get_prefix_larger_than_a_page_is_whole_and_consistent(
        make_store: Callable[[], Store], prefix: str) -> None:
    store, writer = make_store(), make_store()
    count = PAGE * 3 + 7  # more than three pages, the last one partial
    for i in range(count):
        store.put(f"{prefix}s/{i:04d}", f"v{i}")
    store.put(prefix[:-1] + "Y", "outside")  # just past the prefix: never read
    before = store.round_trips
    entries = store.get_prefix(prefix)
    assert [e.value for e in entries.values()] == [f"v{i}" for i in range(count)]
    assert store.round_trips - before <= count // PAGE + 1  # pages, not a read per key

    # a write between two pages is not half seen: every page is read at the first's revision
    if not hasattr(store, "page_size"):
        return  # no paging on this backend: one request is consistent by itself
    real_call, pages = store._call, []  # type: ignore[attr-defined]

    def call(fn, **kwargs):  # type: ignore[no-untyped-def]
        if pages == [1]:  # between the first and the second page
            writer.put(f"{prefix}s/0000", "changed")
            writer.put(f"{prefix}s/{count - 1:04d}", "changed")
        pages.append(1)
        return real_call(fn, **kwargs)

    store._call = call  # type: ignore[attr-defined]
    entries = store.get_prefix(prefix)
    assert len(pages) == count // PAGE + 1
    assert entries[f"{prefix}s/0000"].value == "v0"
    assert entries[f"{prefix}s/{count - 1:04d}"].value == f"v{count - 1}"  # not "changed"
    assert store.get(f"{prefix}s/{count - 1:04d}").value == "changed"  # type: ignore[union-attr]


def test_get_revisions_gives_each_keys_revision_in_pages(store: Store, prefix: str) -> None:
    count = PAGE + 3  # more than a page
    for i in range(count):
        store.put(f"{prefix}r/{i:04d}", "x" * 100)
    store.put(prefix[:-1] + "Z", "outside")
    changed = store.put(f"{prefix}r/0001", "y")
    before = store.round_trips
    revisions = store.get_revisions(prefix)
    assert store.round_trips - before <= count // PAGE + 1
    entries = store.get_prefix(prefix)
    assert revisions == {key: entry.revision for key, entry in entries.items()}
    assert len(revisions) == count and revisions[f"{prefix}r/0001"] == changed
    assert store.get_revisions(prefix + "nothing/") == {}


def test_create_many_creates_the_absent_keys_in_few_requests(store: Store, prefix: str) -> None:
    store.put(prefix + "k0007", "there before")
    items = {f"{prefix}k{i:04d}": f"v{i}" for i in range(250)}
    before = store.round_trips
    created = store.create_many(items)
    assert created == set(items) - {prefix + "k0007"}
    values = {k: e.value for k, e in store.get_prefix(prefix).items()}
    assert values == {**items, prefix + "k0007": "there before"}  # left as it was
    if store.fences:  # backends with transactions batch them
        assert store.round_trips - before < 20, f"{store.round_trips - before} requests"
    assert store.create_many(items) == set()  # all there now: nothing created


def test_revisions_grow(store: Store, prefix: str) -> None:
    first = store.put(prefix + "a", "1")
    second = store.put(prefix + "a", "2")
    other = store.put(prefix + "b", "1")
    assert first < second < other
    assert store.get(prefix + "a").revision == second  # type: ignore[union-attr]
    store.delete(prefix + "b")
    assert store.put(prefix + "b", "2") > other


def test_create(store: Store, prefix: str) -> None:
    assert store.create(prefix + "k", "first") is True
    assert store.create(prefix + "k", "second") is False
    assert store.get(prefix + "k").value == "first"  # type: ignore[union-attr]


def test_replace(store: Store, prefix: str) -> None:
    assert store.replace(prefix + "absent", "x", 1) is False
    assert store.get(prefix + "absent") is None
    revision = store.put(prefix + "k", "v1")
    assert store.replace(prefix + "k", "v2", revision) is True
    assert store.replace(prefix + "k", "v3", revision) is False  # lost race: stale revision
    entry = store.get(prefix + "k")
    assert entry is not None and entry.value == "v2" and entry.revision > revision
    assert store.replace(prefix + "k", "v4", 0) is False


def test_put_if_returns_the_revision_the_next_compare_and_set_needs(
        store: Store, prefix: str) -> None:
    key = prefix + "k"
    first = store.put_if(key, "v1", None)
    assert first is not None and store.get(key) == Entry(key, "v1", first)
    assert store.put_if(key, "again", None) is None  # exists: not created twice
    second = store.put_if(key, "v2", first)
    assert second is not None and second > first
    assert store.put_if(key, "v3", first) is None  # lost race: stale revision
    assert store.put_if(key, "v3", 0) is None
    assert store.get(key) == Entry(key, "v2", second)
    assert store.put_if(prefix + "absent", "x", 5) is None
    assert store.get(prefix + "absent") is None


def test_put_all_if_writes_all_or_nothing(store: Store, prefix: str) -> None:
    a, b, c = prefix + "a", prefix + "b", prefix + "c"
    first = store.put_if(a, "a1", None)
    written = store.put_all_if([(a, "a2", first), (b, "b1", None)])
    assert written is not None and len(written) == 2 and min(written) > first
    assert [store.get(a), store.get(b)] == [Entry(a, "a2", written[0]), Entry(b, "b1", written[1])]
    assert store.put_all_if([(a, "a3", written[0]), (b, "b2", None)]) is None  # b exists
    assert store.get(b) == Entry(b, "b1", written[1])
    if store.fences:  # a backend with transactions: the first write did not happen either
        assert store.get(a) == Entry(a, "a2", written[0])
    assert store.put_all_if([(c, "c1", None), (a, "a4", first)]) is None  # a is stale
    assert store.get(a).value in ("a2", "a3")  # type: ignore[union-attr]
    if store.fences:
        assert store.get(c) is None


def test_delete(store: Store, prefix: str) -> None:
    assert store.delete(prefix + "absent") is False
    revision = store.put(prefix + "k", "v1")
    store.put(prefix + "k", "v2")
    assert store.delete(prefix + "k", revision) is False  # changed since
    assert store.get(prefix + "k") is not None
    current = store.get(prefix + "k").revision  # type: ignore[union-attr]
    assert store.delete(prefix + "k", current) is True
    assert store.get(prefix + "k") is None
    assert store.delete(prefix + "k", current) is False
    store.put(prefix + "k", "v3")
    assert store.delete(prefix + "k") is True
    assert store.get(prefix + "k") is None


def test_concurrent_compare_and_set_has_one_winner(
    make_store: Callable[[], Store], prefix: str
) -> None:
    stores = [make_store(), make_store()]
    for round_ in range(8):
        key = f"{prefix}race{round_}"
        barrier = threading.Barrier(2)
        created: list[bool] = []
        replaced: list[bool] = []

        def contend(store: Store, me: str, key: str = key, barrier: threading.Barrier = barrier,
                    created: list[bool] = created, replaced: list[bool] = replaced) -> None:
            barrier.wait()
            created.append(store.create(key, me))
            barrier.wait()
            revision = store.get(key).revision  # type: ignore[union-attr]
            barrier.wait()  # both read the same revision, then both try to replace it
            replaced.append(store.replace(key, me + "!", revision))

        threads = [threading.Thread(target=contend, args=(s, f"t{i}"))
                   for i, s in enumerate(stores)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert sorted(created) == [False, True]
        assert sorted(replaced) == [False, True]


# -- leases ----------------------------------------------------------------


def test_lease_expiry_removes_keys(store: Store, prefix: str) -> None:
    lease = store.lease(TTL)
    assert store.create(prefix + "a", "1", lease=lease)
    store.put(prefix + "b", "2", lease=lease)
    store.put(prefix + "kept", "3")
    assert store.get(prefix + "a") is not None
    wait_for(lambda: not store.get_prefix(prefix + "a") and store.get(prefix + "b") is None,
             EXPIRY, "leased keys expire")
    assert store.get(prefix + "kept") is not None
    with pytest.raises(StoreError):
        lease.refresh()


def test_refresh_keeps_keys_alive(store: Store, prefix: str) -> None:
    lease = store.lease(TTL)
    store.put(prefix + "a", "1", lease=lease)
    revision = store.put(prefix + "b", "2", lease=lease)
    deadline = time.monotonic() + 2.5 * TTL + 0.5  # past the ttl (and etcd's minimum TTL)
    while time.monotonic() < deadline:
        time.sleep(TTL / 4)
        lease.refresh()
        assert store.get(prefix + "a") is not None
    entry = store.get(prefix + "b")
    assert entry is not None and entry.value == "2"
    if not type(store).__name__.startswith("Etcd2"):  # a v2 refresh moves modifiedIndex
        assert entry.revision == revision
    wait_for(lambda: store.get(prefix + "a") is None, EXPIRY, "keys expire once refresh stops")


def test_revoke_removes_keys(store: Store, prefix: str) -> None:
    lease = store.lease(30)
    store.put(prefix + "a", "1", lease=lease)
    store.create(prefix + "b", "2", lease=lease)
    lease.revoke()
    assert store.get_prefix(prefix) == {}
    with pytest.raises(StoreError):
        store.put(prefix + "c", "3", lease=lease)


def test_rewrite_without_lease_detaches_key(store: Store, prefix: str) -> None:
    lease = store.lease(TTL)
    store.put(prefix + "a", "1", lease=lease)
    store.put(prefix + "b", "1", lease=lease)
    store.put(prefix + "a", "2")
    wait_for(lambda: store.get(prefix + "b") is None, EXPIRY, "the lease expires")
    assert store.get(prefix + "a").value == "2"  # type: ignore[union-attr]


# -- watches ---------------------------------------------------------------


def test_watch_sees_changes_under_prefix_only(
    make_store: Callable[[], Store], prefix: str
) -> None:
    watcher, writer = make_store(), make_store()
    seen = Recorder()
    watch = watcher.watch(prefix, seen)
    try:
        writer.put(prefix[:-1] + "X/sibling", "no")
        writer.put("/shipmate-test/elsewhere/" + uuid.uuid4().hex, "no")
        writer.put(prefix + "a", "1")
        seen.wait_event(WatchEvent(prefix + "a", "1"))
        writer.put(prefix + "deep/b", "2")
        seen.wait_event(WatchEvent(prefix + "deep/b", "2"))
        writer.delete(prefix + "a")
        seen.wait_event(WatchEvent(prefix + "a", None))
        assert all(event.key.startswith(prefix) for event in seen.events)
    finally:
        watch.cancel()


def test_watch_cancel_stops_callbacks(store: Store, prefix: str) -> None:
    seen = Recorder()
    watch = store.watch(prefix, seen)
    store.put(prefix + "a", "1")
    seen.wait_event(WatchEvent(prefix + "a", "1"))
    watch.cancel()
    calls = len(seen.calls)
    store.put(prefix + "a", "2")
    observation_window(0.3, "a cancelled watch must call back no more")
    assert len(seen.calls) == calls


def test_watch_sees_lease_expiry_as_delete(store: Store, prefix: str) -> None:
    seen = Recorder()
    watch = store.watch(prefix, seen)
    try:
        store.put(prefix + "leased", "1", lease=store.lease(TTL))
        seen.wait_event(WatchEvent(prefix + "leased", "1"))
        seen.wait_event(WatchEvent(prefix + "leased", None), timeout=EXPIRY)
    finally:
        watch.cancel()


def test_watch_survives_a_failing_callback(store: Store, prefix: str) -> None:
    seen = Recorder()

    def flaky(events: list[WatchEvent]) -> None:
        seen(events)
        raise RuntimeError("callback bug")

    watch = store.watch(prefix, flaky)
    try:
        store.put(prefix + "a", "1")
        seen.wait_event(WatchEvent(prefix + "a", "1"))
        store.put(prefix + "a", "2")
        seen.wait_event(WatchEvent(prefix + "a", "2"))
    finally:
        watch.cancel()


# -- failures --------------------------------------------------------------


def test_unreachable_backend_raises_store_error(backend: str, tmp_path: Path) -> None:
    if backend == "embedded":
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        with pytest.raises(StoreError):
            EmbeddedStore(blocker / "sub" / "state.db")
        return
    endpoint = f"http://user:s3cret@127.0.0.1:{free_port()}"  # nothing listens there
    if backend == "etcd":
        from agent.store.etcd3 import Etcd3Store as Backend
    else:
        from agent.store.etcd2 import Etcd2Store as Backend  # type: ignore[assignment]
    store = Backend([endpoint], timeout=1.0)
    lease = store.lease(5) if backend == "etcd2" else None  # v2 leases are local
    calls: list[Callable[[], object]] = [
        lambda: store.get("/k"),
        lambda: store.get_prefix("/k/"),
        lambda: store.put("/k", "v"),
        lambda: store.create("/k", "v"),
        lambda: store.replace("/k", "v", 3),
        lambda: store.delete("/k"),
        lambda: store.delete("/k", 3),
        (lambda: store.lease(5)) if lease is None else (lambda: store.put("/k", "v", lease=lease)),
    ]
    for call in calls:
        with pytest.raises(StoreError) as info:
            call()
        message = str(info.value)
        assert f"127.0.0.1:{endpoint.rsplit(':', 1)[1]}" in message
        assert "s3cret" not in message
    watch = store.watch("/k/", Recorder())  # a watch waits for the backend instead of failing
    watch.cancel()
    store.close()


@pytest.mark.parametrize("backend", ETCD_BACKENDS)
def test_etcd_endpoints_are_tried_in_turn(backend: str, etcd: Etcd, prefix: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    if backend == "etcd":
        from agent.store.etcd3 import Etcd3Store as Backend
    else:
        from agent.store.etcd2 import Etcd2Store as Backend  # type: ignore[assignment]
    store = Backend([dead, etcd.endpoint], timeout=2.0)
    try:
        assert store.create(prefix + "k", "v") is True
        assert store.get(prefix + "k").value == "v"  # type: ignore[union-attr]
    finally:
        store.close()


# -- the ops contract: keys written with etcdctl ---------------------------


def test_etcd_reads_what_etcdctl_writes(etcd: Etcd) -> None:
    from agent.store.etcd3 import Etcd3Store

    prefix = f"/shipmate-test/etcdctl/{uuid.uuid4().hex[:12]}/"
    store = Etcd3Store([etcd.endpoint], timeout=5.0)
    try:
        etcd.etcdctl("put", prefix + "services/web/override", "3")
        entry = store.get(prefix + "services/web/override")
        assert entry is not None and entry.value == "3" and int(entry.value) == 3
        assert list(store.get_prefix(prefix + "services/")) == [prefix + "services/web/override"]
        store.put(prefix + "services/web/desired", "5")
        out = etcd.etcdctl("get", "--print-value-only", prefix + "services/web/desired")
        assert out.strip() == "5"
        etcd.etcdctl("del", prefix + "services/web/override")
        assert store.get(prefix + "services/web/override") is None
    finally:
        store.close()


def test_etcd2_reads_what_etcdctl_v2_writes(etcd: Etcd) -> None:
    from agent.store.etcd2 import Etcd2Store

    def etcdctl2(*args: str) -> str:
        env = dict(os.environ, ETCDCTL_API="2")
        return subprocess.run([etcd.etcdctl_binary, f"--endpoints={etcd.endpoint}", *args],
                              env=env, capture_output=True, text=True, check=True,
                              timeout=30).stdout

    prefix = f"/shipmate-test/etcdctl2/{uuid.uuid4().hex[:12]}/"
    store = Etcd2Store([etcd.endpoint], timeout=5.0)
    try:
        etcdctl2("set", prefix + "services/web/override", "3")
        entry = store.get(prefix + "services/web/override")
        assert entry is not None and entry.value == "3"
        store.put(prefix + "services/web/desired", "5")
        assert etcdctl2("get", prefix + "services/web/desired").strip() == "5"
    finally:
        store.close()


# -- the embedded store across processes -----------------------------------


def test_embedded_store_is_shared_by_processes(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = EmbeddedStore(path)
    seen = Recorder()
    watch = store.watch("/shared/", seen)
    try:
        code = (
            "import sys; from agent.store.embedded import EmbeddedStore; "
            "s = EmbeddedStore(sys.argv[1]); s.put('/shared/desired', '4'); "
            "assert s.create('/shared/lock', 'child')"
        )
        path_var = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        env = dict(os.environ, PYTHONPATH=path_var)
        subprocess.run([sys.executable, "-c", code, str(path)], env=env, cwd=ROOT, check=True,
                       timeout=60)
        seen.wait_event(WatchEvent("/shared/desired", "4"), timeout=15.0)
        seen.wait_event(WatchEvent("/shared/lock", "child"), timeout=15.0)
        assert store.create("/shared/lock", "parent") is False
        assert store.get("/shared/desired").value == "4"  # type: ignore[union-attr]
    finally:
        watch.cancel()
        store.close()


# -- etcd going away -------------------------------------------------------


@pytest.mark.parametrize("backend", ETCD_BACKENDS)
def test_watch_delivers_again_after_etcd_restarts(
    backend: str, etcd: Etcd, request: pytest.FixtureRequest, tmp_path: Path, prefix: str
) -> None:
    store = open_backend(backend, request, tmp_path)
    seen = Recorder()
    watch = store.watch(prefix, seen)
    try:
        store.put(prefix + "before", "1")
        seen.wait_event(WatchEvent(prefix + "before", "1"))
        resyncs = seen.resyncs
        etcd.stop()
        try:
            with pytest.raises(StoreError):
                store.get(prefix + "before")  # etcd down: an error, never a half answer
            requests_before = store.round_trips
            observation_window(1.5, "the watch notices, retries and backs off...")
            assert store.round_trips - requests_before <= 8  # ...without spinning
        finally:
            etcd.start()  # other tests share this etcd
        # on reconnecting, the watch asks the caller to re-read...
        assert seen.wait(lambda: seen.resyncs > resyncs, timeout=10.0), seen.calls
        # ...and delivers changes again
        store.put(prefix + "after", "2")
        seen.wait_event(WatchEvent(prefix + "after", "2"), timeout=15.0)
    finally:
        watch.cancel()
        store.close()
