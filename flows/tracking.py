"""MLflow bookkeeping for a flow run: one parent run, one child run per (dataset, seed).

Everything goes through an explicit `MlflowClient` and explicit run ids: MLflow's "active run"
is thread-local and Prefect runs tasks in threads. The flow logs child runs from several threads
into one store, so every client call of a Tracker holds a lock shared by all Trackers of that store
in the process: SQLite allows one writer, and concurrent writes would fail with "database is locked".

Fine-tuned students become MLflow 3 logged models (the runs table's Models column) and registered
versions whose source is the logged model's folder (T5 cannot go through mlflow.transformers under
transformers 5). A model whose content hash already has a registered version is not uploaded
again: the new run is tagged with that version and linked to its logged model, which keeps cached
reruns fast. The alias `best` follows the version with the highest dev F1.

Runs carry MLflow's source tags (commit, dirty, branch) and their datasets as run inputs; the
experiment is marked as custom model development, so MLflow 3's UI opens on the runs table.

A workdir can be moved or copied (`mv fsa-work fsa-moved`). MLflow keeps absolute artifact URIs in
its database, so with a local SQLite store the Tracker first points the URIs that lead into the
artifact root's previous location at its current one (see `relocate`).
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import math
import os
import sqlite3
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlparse
from urllib.request import url2pathname

from mlflow.entities import DatasetInput, InputTag, LoggedModelOutput, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_BRANCH,
    MLFLOW_GIT_COMMIT,
    MLFLOW_GIT_DIRTY,
    MLFLOW_GIT_REPO_URL,
    MLFLOW_MODEL_VERSIONS,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
)

from fsa_distill import ROOT
from fsa_distill.progress import history_metrics, timestamp_ms
from fsa_distill.redact import redact_text

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.data.dataset_source import DatasetSource

log = logging.getLogger(__name__)

# The artifact root's own absolute path when a Tracker last used it; it travels with the root, so a
# value other than the root's current path means the root was moved or copied from there.
MARKER = ".location"

# (table, column, tag key or None): where MLflow 3.17's SQL stores keep absolute artifact locations.
# Tables or columns an older or newer schema lacks are skipped.
LOCATION_COLUMNS: tuple[tuple[str, str, str | None], ...] = (
    ("experiments", "artifact_location", None),
    ("runs", "artifact_uri", None),
    ("model_versions", "source", None),
    ("model_versions", "storage_location", None),
    ("logged_models", "artifact_location", None),
    ("workspaces", "default_artifact_root", None),
    ("trace_tags", "value", "mlflow.artifactLocation"),
)


def _git(*args: str) -> str | None:
    """Output of `git <args>` in the checkout, or None when git or the checkout is missing."""
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def git_commit() -> str:
    """The checkout's commit as a plain SHA (MLflow links it to the repository), or `unknown`.

    Uncommitted changes are reported apart, in `source_tags()["mlflow.source.git.dirty"]`.
    """
    return _git("rev-parse", "HEAD") or "unknown"


@functools.cache
def _source_tags() -> dict[str, str]:
    sha = _git("rev-parse", "HEAD")
    origin = _git("remote", "get-url", "origin")
    origin = redact_text(origin) if origin else None  # an https remote may carry a token
    tags = {MLFLOW_SOURCE_NAME: origin or str(ROOT), MLFLOW_SOURCE_TYPE: "LOCAL"}
    if sha:
        tags[MLFLOW_GIT_COMMIT] = sha
        tags[MLFLOW_GIT_DIRTY] = "true" if (_git("status", "--porcelain") or "") else "false"
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":  # "HEAD" means a detached checkout: no branch to name
            tags[MLFLOW_GIT_BRANCH] = branch
        if origin:
            tags[MLFLOW_GIT_REPO_URL] = origin
    return tags


def source_tags() -> dict[str, str]:
    """MLflow's source tags for runs of this checkout (origin or path, commit, dirty, branch, repo URL).

    Computed once per process: a flow's runs all come from the code that started it, and git is not
    asked again for every child run. Git tags are left out when the code is not a git checkout.
    """
    return dict(_source_tags())


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested config -> {"finetune.learning_rate": "0.001", ...} for MLflow params.

    Every value is redacted (`fsa_distill.redact`): a URL's userinfo and secret query values
    (`tracking.uri`, `teacher.base_url`) become `***`, so MLflow params never hold credentials.
    """
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, sub in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return out
    return {prefix: redact_text(json.dumps(value) if isinstance(value, list) else str(value))}


def numeric(values: dict[str, Any]) -> dict[str, float]:
    """The entries of `values` that are numbers (not bools, not None): what MLflow metrics can hold."""
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local `sqlite:///` tracking URI; None otherwise, so servers are never rewritten."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextmanager
def db_lock(db: Path | None) -> Iterator[None]:
    """Hold an exclusive lock on `<db>.lock` across processes (no-op without a local database).

    Two runs started together on a fresh workdir both create the SQLite database, and MLflow's
    migration of the second one fails ("Online migration expected to match one row"): creating
    it, like relocating it, is done by one process at a time.
    """
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def location_path(location: str | None) -> Path | None:
    """The local path of a stored artifact location (`file://` URI or bare path); None when it is remote."""
    if not location:
        return None
    if location.startswith("file:"):
        parsed = urlparse(location)
        return Path(url2pathname(parsed.path)) if parsed.netloc in ("", "localhost") else None
    return Path(location) if location.startswith("/") else None


def spellings(old: Path, new: Path) -> list[tuple[str, str]]:
    """Each way MLflow may have written `old` into the database, paired with the same spelling of `new`."""
    pairs = [
        (old.as_uri(), new.as_uri()),
        (f"file://{old}", f"file://{new}"),
        (f"file:{old}", f"file:{new}"),
        (str(old), str(new)),
    ]
    return list(dict.fromkeys(pairs))


def relocate(db: Path, old: Path, new: Path) -> int:
    """Rewrite stored locations under `old` to lie under `new`, in one transaction; returns the rows changed.

    Only values equal to `old` or below it change, so a location the user chose elsewhere is left alone.
    Comparisons use `substr`, not LIKE: percent-encoded URIs and `_` would be wildcards there.
    """
    con = sqlite3.connect(db, timeout=60, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")  # one writer at a time: concurrent Trackers see all or nothing
        changed = 0
        try:
            for table, column, key in LOCATION_COLUMNS:
                columns = {row[1] for row in con.execute(f'PRAGMA table_info("{table}")')}
                if column not in columns or (key is not None and "key" not in columns):
                    continue
                for before, after in spellings(old, new):
                    sql = (
                        f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?) '
                        f'WHERE ("{column}" = ? OR substr("{column}", 1, ?) = ?)'
                    )
                    args: list[Any] = [after, len(before) + 1, before, len(before) + 1, before + "/"]
                    if key is not None:
                        sql += ' AND "key" = ?'
                        args.append(key)
                    changed += con.execute(sql, args).rowcount
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return changed
    finally:
        con.close()


def previous_root(db: Path, experiment: str, root: Path) -> Path | None:
    """Where the artifact root lived when the database last wrote locations into it, if not at `root` now.

    The marker inside the root answers directly. A root without one (made before the marker existed)
    counts as moved from the experiment's stored location when that location is a same-named folder and
    is gone, or when artifacts the database places there are found under `root`: a database shared by
    several workdirs is then never pointed away from artifacts that still live where it says.
    """
    marker = root / MARKER
    recorded = Path(marker.read_text().strip()) if marker.is_file() else None
    if recorded is not None and recorded.is_absolute():  # a damaged marker falls back to the inference below
        return recorded if recorded != root else None
    con = sqlite3.connect(db, timeout=60)
    try:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"experiments", "runs"} <= tables:
            return None
        row = con.execute(
            "SELECT experiment_id, artifact_location FROM experiments WHERE name = ? ORDER BY experiment_id",
            (experiment,),
        ).fetchone()
        if row is None:
            return None
        old = location_path(row[1])
        if old is None or old == root or old.name != root.name:
            return None
        if not old.exists():
            return old
        for (uri,) in con.execute("SELECT artifact_uri FROM runs WHERE experiment_id = ?", (row[0],)):
            path = location_path(uri)
            if path is not None and path.is_relative_to(old) and (root / path.relative_to(old)).exists():
                return old
        return None
    finally:
        con.close()


def write_marker(root: Path) -> None:
    """Record `root`'s current absolute path inside it (atomically), for the next `previous_root`."""
    marker = root / MARKER
    if marker.is_file() and marker.read_text().strip() == str(root):
        return
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=MARKER, dir=root)
    with os.fdopen(fd, "w") as out:
        out.write(f"{root}\n")
    os.replace(tmp, marker)


#: Experiment tag MLflow 3's UI reads to choose between the GenAI overview and the runs table.
EXPERIMENT_KIND = "mlflow.experimentKind"
CUSTOM_MODEL_DEVELOPMENT = "custom_model_development"
#: Registered model alias that follows the version with the highest `dev_f1` version tag.
BEST_ALIAS = "best"
#: MLflow's limits per `log_batch` (metrics, params) and per `log_inputs` (datasets).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_DATASETS_PER_BATCH = 1000
MAX_DIGEST = 36  # characters MLflow keeps of a dataset digest

# One lock per tracking URI in this process, shared by every Tracker (and its client) on that store.
_STORE_LOCKS: dict[str, threading.RLock] = {}
_STORE_LOCKS_GUARD = threading.Lock()


def store_lock(uri: str) -> threading.RLock:
    """The process-wide re-entrant lock for the tracking store at `uri`."""
    with _STORE_LOCKS_GUARD:
        return _STORE_LOCKS.setdefault(uri, threading.RLock())


class LockedClient:
    """An `MlflowClient` whose every method call holds a lock.

    `Tracker.client` is one, so calls the flow makes on it directly (`log_text`, ...) are serialized
    with the Tracker's own: two threads never write into the SQLite store at the same time.
    """

    def __init__(self, client: MlflowClient, lock: threading.RLock) -> None:
        self._client = client
        self._lock = lock

    def __getattr__(self, name: str) -> Any:
        if name in ("_client", "_lock"):  # not set yet (copy, unpickling): no recursion through __getattr__
            raise AttributeError(name)
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return locked


def _now_ms() -> int:
    return int(time.time() * 1000)


def _metric_list(values: dict[str, Any], timestamp_ms: int, step: int) -> list[Metric]:
    """MLflow metrics for the numbers in `values`; None, NaN and bools are skipped (MLflow cannot plot them)."""
    out = []
    for key, value in values.items():
        if value is None or isinstance(value, bool):
            continue
        number = float(value)
        if not math.isnan(number):
            out.append(Metric(key, number, timestamp_ms, step))
    return out


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _dataset_source(raw: str) -> DatasetSource:
    """A dataset source for a path or URI, found through MLflow's registry without reading the data.

    Local paths become MLflow's local artifact source (the UI shows the path); other URIs go to
    whichever registered source claims them, falling back to the local source holding the URI as text.
    """
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source

    local = next(s for s in get_registered_sources() if s._get_source_type() == "local")
    if urlparse(raw).scheme in ("", "file"):
        return local(raw)
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": the most specific one wins
        warnings.simplefilter("ignore")
        try:
            return resolve_dataset_source(raw)
        except MlflowException:
            return local(raw)


def _float_tag(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return None if number is None or math.isnan(number) else number


def _logged_model_name(name: str) -> str:
    """`name` without the characters MLflow refuses in a logged model's name (`/ : . % " '`)."""
    return "".join("-" if c in "/:.%\"'" else c for c in name) or "model"


class Tracker:
    """Thin wrapper over MlflowClient with the project's run layout."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | str | None = None) -> None:
        """Open (or create) `experiment`; a moved workdir's SQLite store is first pointed at its new root.

        `artifact_root` is a folder or a URL (`s3://bucket/prefix/mlflow`, for a remote store): where
        a new experiment keeps its artifacts. An existing experiment keeps its own location.
        """
        db = sqlite_path(uri)
        remote_root = artifact_root if isinstance(artifact_root, str) and "://" in artifact_root else None
        root = Path(artifact_root).resolve() if artifact_root is not None and remote_root is None else None
        self._lock = store_lock(uri)
        with self._lock, db_lock(db):
            if db is not None and root is not None and db.is_file():
                old = previous_root(db, experiment, root)
                if old is not None:
                    changed = relocate(db, old, root)
                    log.info("MLflow locations moved from %s to %s (%d rows)", old, root, changed)
            self.client = cast(MlflowClient, LockedClient(MlflowClient(tracking_uri=uri, registry_uri=uri), self._lock))
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                location = remote_root or (root.as_uri() if root is not None else None)
                location = None if uri.startswith("http") else location
                try:
                    self.experiment_id = self.client.create_experiment(
                        experiment, artifact_location=location, tags={EXPERIMENT_KIND: CUSTOM_MODEL_DEVELOPMENT}
                    )
                except MlflowException:  # created concurrently by another process
                    found = self.client.get_experiment_by_name(experiment)
                    self.experiment_id = found.experiment_id
                else:
                    found = self.client.get_experiment(self.experiment_id)
            else:
                self.experiment_id = found.experiment_id
            if EXPERIMENT_KIND not in found.tags:  # made before the tag, or by another tool
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, CUSTOM_MODEL_DEVELOPMENT)
            if db is not None and root is not None and location_path(found.artifact_location) == root:
                write_marker(root)
        # find_reusable's memory: kind -> {artifact_sha256: newest FINISHED run id}, one search per kind
        self._reusable: dict[str, dict[str, str]] = {}
        # runs this Tracker started with a `kind` tag (and `artifact_sha256` if given then), for `end`
        self._keyed: dict[str, tuple[str, str | None]] = {}

    def ui_url(self, ui_base: str, run_id: str | None = None) -> str:
        """Link to a run (or the experiment's runs table) in the MLflow UI served at `ui_base`.

        `workflowType=machine_learning` opens the classic runs view even where the UI would default
        to its GenAI pages.
        """
        page = f"runs/{run_id}" if run_id else "runs"
        return f"{ui_base.rstrip('/')}/#/experiments/{self.experiment_id}/{page}?workflowType=machine_learning"

    def start(self, name: str, params: dict[str, str], tags: dict[str, str], parent: str | None = None) -> str:
        """Create a run (a child when `parent` is given) with the checkout's source tags, and log its params.

        The caller's `tags` win over the source tags. A run tagged `kind` here and `artifact_sha256`
        (here or later) becomes findable by `find_reusable` as soon as `end` closes it FINISHED.
        """
        tags = {**source_tags(), **tags}
        if parent:
            tags[MLFLOW_PARENT_RUN_ID] = parent
        with self._lock:
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            for chunk in _chunks(list(params.items()), MAX_PARAMS_PER_BATCH):
                self.client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in chunk])
            if tags.get("kind"):
                self._keyed[run_id] = (tags["kind"], tags.get("artifact_sha256"))
        return run_id

    def _log_metrics(self, run_id: str, batch: list[Metric]) -> None:
        with self._lock:
            for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
                self.client.log_batch(run_id, metrics=chunk)

    def metrics(self, run_id: str, values: dict[str, float], step: int = 0, timestamp_ms: int | None = None) -> None:
        """Log a dict of metrics at one step, stamped `timestamp_ms` (when they were measured) or now."""
        self._log_metrics(run_id, _metric_list(values, _now_ms() if timestamp_ms is None else timestamp_ms, step))

    def history(self, run_id: str, log_history: list[dict[str, Any]], times: list[float] | None = None) -> None:
        """Training curves from the Trainer's log history: train loss, lr and dev metrics by step.

        `times[i]` is the wall-clock time (`time.time()`, seconds) at which `log_history[i]` was
        logged: with it the UI's relative/wall-time axes show the real training time, not the moment
        the flow copied the curve into MLflow (times that do not match the entries one to one are
        ignored, with a warning). Everything goes out in batches of at most 1000 metrics.
        """
        if times is not None and len(times) != len(log_history):  # a curve without times beats a failed run
            log.warning("run %s: %d times for %d history entries, logged at now", run_id, len(times), len(log_history))
            times = None
        now = _now_ms()
        batch: list[Metric] = []
        for i, entry in enumerate(log_history):
            # the names and the millisecond stamps the live callback used, so replayed points match them
            stamp = timestamp_ms(times[i]) if times is not None else now
            batch += _metric_list(history_metrics(entry), stamp, int(entry.get("step", 0)))
        self._log_metrics(run_id, batch)

    def files(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder as run artifacts."""
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_table(self, run_id: str, df: pd.DataFrame, artifact_file: str) -> None:
        """Log `df` as a table artifact (`.json` or `.parquet`), which the UI previews and compares across runs."""
        self.client.log_table(run_id, data=df, artifact_file=artifact_file)

    def log_datasets(self, run_id: str, inputs: Iterable[dict[str, str]]) -> None:
        """Record the datasets a run used as MLflow dataset inputs (the UI's Datasets column), without loading them.

        Each item: `name` ("atsa/rest14:train"), `digest` (content hash; MLflow keeps 36 characters),
        `source` (local path or URI) and `context` ("train", "dev", "test", "corpus", ...).
        """
        from mlflow.data.meta_dataset import MetaDataset

        datasets = []
        for item in inputs:
            dataset = MetaDataset(
                source=_dataset_source(str(item["source"])), name=item["name"], digest=str(item["digest"])[:MAX_DIGEST]
            )
            tags = [InputTag(MLFLOW_DATASET_CONTEXT, item["context"])] if item.get("context") else []
            datasets.append(DatasetInput(dataset._to_mlflow_entity(), tags=tags))
        with self._lock:
            for chunk in _chunks(datasets, MAX_DATASETS_PER_BATCH):
                self.client.log_inputs(run_id, datasets=chunk)

    def register(
        self,
        run_id: str,
        model_dir: Path,
        name: str,
        sha256: str,
        *,
        metric: float | None = None,
        description: str | None = None,
    ) -> str:
        """Register `model_dir` as a version of `name`, reusing a version with the same content hash.

        A new model becomes a logged model of the run (its artifacts live there, the version's source
        points at them); a known one is only linked to the run as an output, so cached reruns upload
        nothing. `metric` (dev F1: the selection metric, never a test score) is kept as the version
        tag `dev_f1`, and the alias `best` then names the version with the highest one (the earliest
        on ties). Returns the version; the run is tagged `model_version` = `name/version`.
        """
        with self._lock:
            try:
                self.client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            versions = sorted(self.client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
            scores = {str(v.version): _float_tag(v.tags.get("dev_f1")) for v in versions}
            same = next((v for v in versions if v.tags.get("sha256") == sha256), None)
            if same is not None:
                version = str(same.version)
                model_id = same.tags.get("model_id")  # versions registered before logged models have none
                if model_id:
                    self.client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
                if metric is not None and scores[version] is None:
                    self.client.set_model_version_tag(name, version, "dev_f1", repr(float(metric)))
                    scores[version] = float(metric)
            else:
                version = self._new_version(run_id, model_dir, name, sha256, metric, description)
                scores[version] = None if metric is None else float(metric)
            self.client.set_tag(run_id, "model_version", f"{name}/{version}")
            ranked = [(score, -int(v), v) for v, score in scores.items() if score is not None]
            if ranked:
                self.client.set_registered_model_alias(name, BEST_ALIAS, max(ranked)[2])
            return version

    def _new_version(
        self, run_id: str, model_dir: Path, name: str, sha256: str, metric: float | None, description: str | None
    ) -> str:
        """Upload `model_dir` as a logged model of `run_id` and register it as the next version of `name`."""
        model = self.client.create_logged_model(
            self.experiment_id, name=_logged_model_name(name), source_run_id=run_id, tags={"sha256": sha256}
        )
        try:
            self.client.log_model_artifacts(model.model_id, str(model_dir))
        except BaseException:
            self.client.finalize_logged_model(model.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(model.model_id, "READY")
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        tags = {"sha256": sha256, "model_id": model.model_id}
        if metric is not None:
            tags["dev_f1"] = repr(float(metric))
        created = self.client.create_model_version(
            name,
            source=model.artifact_location,  # not models:/<id>: the SQL registry resolves those globally
            run_id=run_id,
            tags=tags,
            description=description,
            model_id=model.model_id,
        )
        version = str(created.version)  # an int from SQL stores, a string from a server
        # the SQL registry does not keep model_id: this tag is what links the logged model to its version
        self.client.set_logged_model_tags(
            model.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([{"name": name, "version": version}])}
        )
        return version

    def find_reusable(self, kind: str, artifact_sha256: str) -> str | None:
        """The newest FINISHED run of this experiment tagged `kind` and `artifact_sha256`, else None.

        One search per kind, remembered for the Tracker's life (and extended by the runs it ends
        itself), so a flow with many cached children does not query the store once per child.
        Runs finished by other processes after that search are not seen.
        """
        with self._lock:
            if kind not in self._reusable:
                found: dict[str, str] = {}
                token = None
                while True:
                    page = self.client.search_runs(
                        [self.experiment_id],
                        filter_string=f"tags.kind = '{kind}' and attributes.status = 'FINISHED'",
                        max_results=1000,
                        order_by=["attributes.start_time DESC"],
                        page_token=token,
                    )
                    for run in page:
                        sha = run.data.tags.get("artifact_sha256")
                        if sha:
                            found.setdefault(sha, run.info.run_id)  # newest first
                    token = page.token
                    if not token:
                        break
                self._reusable[kind] = found
            return self._reusable[kind].get(artifact_sha256)

    def link_reused(self, parent_run_id: str, reused: dict[str, str]) -> None:
        """Record on `parent_run_id` which earlier runs produced the results it reused instead of logging them again.

        `reused` maps a label (e.g. "distill-rest14-42") to the reused run's id; it is stored as
        `reused_runs.json`, with the tags `reused_runs` (how many) and `cached` = `true`.
        """
        with self._lock:
            self.client.log_dict(parent_run_id, dict(reused), "reused_runs.json")
            self.client.log_batch(
                parent_run_id, tags=[RunTag("reused_runs", str(len(reused))), RunTag("cached", "true")]
            )

    @contextmanager
    def child(self, name: str, params: dict[str, str], tags: dict[str, str], parent: str) -> Iterator[str]:
        """A child run that ends FINISHED, or FAILED if logging into it raises (never left RUNNING)."""
        run_id = self.start(name, params, tags, parent=parent)
        ok = False
        try:
            yield run_id
            ok = True
        finally:
            self.end(run_id, ok)

    def end(self, run_id: str, ok: bool) -> None:
        """Close a run as FINISHED or FAILED; a FINISHED keyed run becomes the newest reusable one."""
        status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        with self._lock:
            self.client.set_terminated(run_id, status=status)
            kind, sha = self._keyed.pop(run_id, (None, None))
            if ok and kind is not None and kind in self._reusable:  # only once that kind was searched
                sha = sha or self.client.get_run(run_id).data.tags.get("artifact_sha256")  # tagged after start
                if sha:
                    self._reusable[kind][sha] = run_id
