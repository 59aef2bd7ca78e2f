"""Writing and reading a 100 MB stage output: a local folder store against an S3 store, one run.

    python -m perf.bench_store [--mb 100] [--files 4] [--repeat 3]

Starts a real S3-compatible server (moto's server mode) on 127.0.0.1, then for a stage whose
output is --files files of random bytes (--mb in all, like a model's weight shards):

- publish: `Stage.run` of a stage that copies the files into its output (then hash and seal it,
  publish it; for S3, upload under a fresh generation and create the manifest) against the
  obvious baseline, a plain copy of the same folder (`shutil.copytree` for the folder, one
  `fs.put` of its files for S3);
- fetch: what a stage on another machine does before it reads the output (for S3, download into
  an empty local cache and verify every file's sha256 against the manifest; for the folder, read
  it in place, hashing it) against a plain read (`open().read()` / one `fs.get`, no verification).

Prints MB/s for each (best of --repeat), and the ratios S3 / local and ours / plain. moto keeps
objects in memory in one Python process on this machine, so the S3 numbers measure the protocol
path (HTTP, signing, s3fs), not a real object store's network.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any


def _write(out: Path, *, mb: int, files: int) -> None:
    """`files` files of random bytes, `mb` MB in all."""
    size = mb * 1_000_000 // files
    for i in range(files):
        (out / f"shard-{i}.bin").write_bytes(os.urandom(size))


def _copy(out: Path, *, source: str, nonce: str) -> None:
    """The stage under test: writes a copy of `source` (`nonce` keys a fresh output each time)."""
    shutil.copytree(source, out, dirs_exist_ok=True)


def _best(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      FSSPEC_S3_ENDPOINT_URL=endpoint, FSA_STORE_CACHE=str(work / "cache"))  # fmt: skip
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    server = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait(f"{endpoint}/moto-api/")
        import fsspec
        from fsa_distill.tasks.stage import Stage

        from fsa_distill.artifacts import file_hashes
        from fsa_distill.store import RemoteStore, Store

        fs = fsspec.filesystem("s3", endpoint_url=endpoint, key="bench", secret="bench")
        fs.mkdir("bench")
        stage = Stage("bench", _copy)
        local, remote = Store(work / "store"), RemoteStore("s3://bench/store")
        source = work / "source"
        source.mkdir()
        _write(source, mb=args.mb, files=args.files)
        names = sorted(p.name for p in source.iterdir())
        results: dict[str, float] = {}

        def publish(store: Store) -> None:
            stage.run(store, {"source": str(source), "nonce": uuid.uuid4().hex})

        results["local publish"] = _best(lambda: publish(local), args.repeat)
        results["local plain copy"] = _best(lambda: shutil.copytree(source, work / uuid.uuid4().hex), args.repeat)
        results["s3 publish"] = _best(lambda: publish(remote), args.repeat)
        results["s3 plain put"] = _best(
            lambda: fs.put([str(source / n) for n in names], [f"bench/plain-{uuid.uuid4().hex}/{n}" for n in names]),
            args.repeat,
        )

        art_local = stage.run(local, {"source": str(source), "nonce": "read"})
        art_s3 = stage.run(remote, {"source": str(source), "nonce": "read"})

        def fetch_s3() -> None:
            shutil.rmtree(work / "cache" / "objects" / art_s3.sha256, ignore_errors=True)  # a machine without a copy
            RemoteStore("s3://bench/store").local(art_s3)

        def plain_get() -> None:
            target = work / uuid.uuid4().hex
            target.mkdir()
            gen = remote.manifest(art_s3.rel)["gen"]
            fs.get([f"bench/store/{art_s3.rel}/{gen}/{n}" for n in names], [str(target / n) for n in names])

        def plain_read() -> None:
            for n in names:
                (Path(art_local.path) / n).read_bytes()

        results["local fetch (read + verify)"] = _best(lambda: file_hashes(Path(local.local(art_local).path)),
                                                       args.repeat)  # fmt: skip
        results["local plain read"] = _best(plain_read, args.repeat)
        results["s3 fetch (download + verify)"] = _best(fetch_s3, args.repeat)
        results["s3 plain get"] = _best(plain_get, args.repeat)
    finally:
        server.terminate()
        server.wait(timeout=20)
        shutil.rmtree(work, ignore_errors=True)

    print(f"{args.mb} MB in {args.files} files; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; best of {args.repeat}")  # fmt: skip
    for name, seconds in results.items():
        print(f"  {name:<30} {seconds:7.2f} s  {args.mb / seconds:8.1f} MB/s")
    print(f"S3 / local, publish: {results['s3 publish'] / results['local publish']:.2f}x the time")
    fetch = results["s3 fetch (download + verify)"] / results["local fetch (read + verify)"]
    print(f"S3 / local, fetch:   {fetch:.2f}x")
    print(f"ours / plain, S3 publish: {results['s3 publish'] / results['s3 plain put']:.2f}x; "
          f"S3 fetch: {results['s3 fetch (download + verify)'] / results['s3 plain get']:.2f}x")  # fmt: skip
    print(f"ours / plain, local publish: {results['local publish'] / results['local plain copy']:.2f}x; "
          f"local fetch: {results['local fetch (read + verify)'] / results['local plain read']:.2f}x")  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


if __name__ == "__main__":
    main()
