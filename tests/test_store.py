"""The artifact store at a folder or an S3 URL: the same stages, one code path.

The S3 store is a real S3-compatible server (moto's server mode) on 127.0.0.1 (`s3_endpoint`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import fsspec
import pytest
from fsa_distill.tasks.stage import Stage
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from fsa_distill.artifacts import MANIFEST, Artifact
from fsa_distill.locks import ObjectLeaseLockManager
from fsa_distill.store import RemoteStore, StoreError, open_store

CALLS: list[str] = []


def _seed(out: Path, *, value: int) -> None:
    CALLS.append("seed")
    (out / "value.json").write_text(json.dumps(value))
    (out / "nested").mkdir()
    (out / "nested" / "blob.bin").write_bytes(bytes(range(256)) * (value + 1))


def _double(out: Path, *, source: Artifact, factor: int) -> None:
    CALLS.append("double")
    value = json.loads((Path(source.path) / "value.json").read_text())  # a local path, whatever the store
    (out / "value.json").write_text(json.dumps(value * factor))


seed_stage = Stage("s-seed", _seed)
double_stage = Stage("s-double", _double)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch) -> str:
    """The store URL: a folder, or a bucket on the local S3 server (with this test's own cache)."""
    monkeypatch.setenv("FSA_STORE_CACHE", str(tmp_path / "cache"))
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_url")


def _files(store: str, art: Artifact) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the folder that holds the artifact's files in the store."""
    st = open_store(store)
    if not st.remote:
        return fsspec.filesystem("file"), art.path
    assert isinstance(st, RemoteStore)
    manifest = st.manifest(art.rel)
    return st.fs, f"{st.root}/{art.rel}/{manifest['gen']}"


def _value(art: Artifact) -> int:
    return json.loads((Path(art.path) / "value.json").read_text())


def test_outputs_are_published_reused_and_read_locally(store):
    CALLS.clear()
    a = seed_stage.run(store, {"value": 3})
    assert a.path.startswith("s3://") == store.startswith("s3://")
    b = double_stage.run(store, {"source": a, "factor": 2})
    assert seed_stage.run(store, {"value": 3}) == a
    assert double_stage.run(store, {"source": a, "factor": 2}) == b
    assert CALLS == ["seed", "double"]
    assert _value(open_store(store).local(b)) == 6


def test_an_edited_or_deleted_output_is_recomputed(store):
    CALLS.clear()
    a = seed_stage.run(store, {"value": 3})
    fs, folder = _files(store, a)
    fs.pipe_file(f"{folder}/value.json", b"999")
    assert seed_stage.cached(store, {"value": 3}) is None
    again = seed_stage.run(store, {"value": 3})
    assert _value(open_store(store).local(again)) == 3
    fs, folder = _files(store, again)
    fs.rm_file(f"{folder}/nested/blob.bin")
    assert seed_stage.cached(store, {"value": 3}) is None
    seed_stage.run(store, {"value": 3})
    assert CALLS == ["seed", "seed", "seed"]


def test_another_machine_fetches_verified_copies_into_its_own_bounded_cache(s3_url, tmp_path, monkeypatch):
    here = RemoteStore(s3_url)
    outputs = [seed_stage.run(here, {"value": v}) for v in (1, 2, 3)]
    # machine two: same store, its own empty cache, bounded to one copy (grace 0: nothing is in use)
    monkeypatch.setenv("FSA_STORE_CACHE", str(tmp_path / "two"))
    monkeypatch.setenv("FSA_STORE_CACHE_GB", str(1.5 * 256 * 3 / 1e9))
    monkeypatch.setenv("FSA_STORE_CACHE_GRACE_S", "0")
    there = RemoteStore(s3_url)
    CALLS.clear()
    doubled = double_stage.run(there, {"source": outputs[0], "factor": 5})
    assert CALLS == ["double"] and _value(there.local(doubled)) == 5
    for value, art in zip((1, 2, 3), outputs, strict=True):
        copy = there.local(art)
        assert Path(copy.path).is_relative_to(tmp_path / "two") and _value(copy) == value
        time.sleep(0.02)  # distinct last-use times
    kept = sorted(p.name for p in (tmp_path / "two" / "objects").iterdir() if not p.name.startswith("."))
    assert outputs[0].sha256 not in kept and outputs[2].sha256 in kept, kept  # least recently used went first

    # an object edited behind its manifest: the output no longer counts, and no machine reads it
    fs, folder = _files(s3_url, outputs[1])
    fs.pipe_file(f"{folder}/value.json", b"7")
    assert seed_stage.cached(there, {"value": 2}) is None
    monkeypatch.setenv("FSA_STORE_CACHE", str(tmp_path / "three"))
    with pytest.raises(StoreError, match=r"s3://.*s-seed/.*do not match their manifest"):
        RemoteStore(s3_url).local(outputs[1])


def test_the_first_publication_wins_and_the_loser_leaves_nothing(s3_url, tmp_path):
    st = RemoteStore(s3_url)
    first = seed_stage.run(st, {"value": 4})
    loser = tmp_path / "loser"
    (loser / "measured").mkdir(parents=True)
    (loser / "value.json").write_text("4")
    (loser / "measured" / "timing.json").write_text('{"wall_s": 9}')
    from fsa_distill.artifacts import seal

    seal(loser)
    assert st.publish(loser, first.rel) == first.sha256  # the winner's output, untouched
    assert not loser.exists()
    generations = [p for p in st.fs.ls(f"{st.root}/{first.rel}") if not p.endswith(MANIFEST)]
    assert len(generations) == 1 and st.verify(first.rel) == first.sha256


def test_object_store_locks_exclude_and_expire(s3_url):
    locks = ObjectLeaseLockManager(f"{s3_url}/.locks", lease_s=1.0, poll_s=0.05)
    assert locks.acquire_lock("k", "a")
    assert not locks.acquire_lock("k", "b", acquire_timeout=0.3)  # a's heartbeat keeps it live
    assert locks.is_lock_holder("k", "a")
    locks.release_lock("k", "a")
    assert locks.acquire_lock("k", "b", acquire_timeout=1)
    locks.release_lock("k", "b")
    # a holder that died: its lock object stays, unrenewed, and is taken over after the lease
    locks.fs.pipe_file(locks.object("dead"), json.dumps({"holder": "gone", "beat": 0}).encode())
    started = time.monotonic()
    assert locks.acquire_lock("dead", "c", acquire_timeout=10)
    assert 1.0 <= time.monotonic() - started < 8
    locks.release_lock("dead", "c")


@flow
def _seed_flow(store: str, value: int) -> tuple[str, Artifact]:
    with ThreadPoolTaskRunner(max_workers=1) as runner:
        future = seed_stage.submit(runner, store, {"value": value})
        art = future.result()
        return future.state.name, art


@pytest.mark.usefixtures("prefect_harness")
def test_prefect_keeps_its_cache_records_in_a_remote_store(s3_url):
    CALLS.clear()
    state, art = _seed_flow(s3_url, 5)
    assert state == "Completed" and CALLS == ["seed"]
    st = RemoteStore(s3_url)
    records = st.fs.ls(f"{st.root}/.prefect")
    assert any(Path(r).name == f"s-seed-{seed_stage.key({'value': 5})}" for r in records), records
    state, again = _seed_flow(s3_url, 5)
    assert state == "Cached" and again == art and CALLS == ["seed"]
    st.fs.rm_file(f"{st.root}/{art.rel}/{MANIFEST}")  # the output is gone: the record is forgotten
    state, third = _seed_flow(s3_url, 5)
    assert state == "Completed" and CALLS == ["seed", "seed"] and third.sha256 == art.sha256
