"""Sweep report: a Hydra callback that turns a multirun's jobs into F1-versus-setting curves.

Registered under `hydra.callbacks` in `conf/config.yaml`; it acts only in multirun mode
(`fsa-distill run -m ...`) and leaves single runs alone.

* `on_job_start` / `on_job_end` (in the job's process, whatever the launcher): the job's flow
  result is located and written to `<job output dir>/fsa_job.json` with the job's overrides, its
  tracking URI and experiment. The result is read from `<job output dir>/result.json` when the CLI
  wrote one, else from the JSON line `{"parent_run_id": ..., "report": ...}` that `fsa-distill run`
  prints at the end of a job (the callback copies what the job writes to stdout while it runs).
  With `hydra/launcher=prefect` (`fsa_distill.launcher`) the jobs are flow runs on Prefect workers:
  with `--wait` the launcher fires both callbacks for each run once it is final, with a
  `result.json` from the run's result (which also names the deployment's workdir and MLflow);
  without `--wait` nothing is collected and no report is written.
* `on_multirun_end` (on the launching machine): every job's `per_seed.csv` (from its report folder)
  is combined with the values of the swept settings into `<sweep dir>/report/`:

  - `sweep_per_seed.csv`: one row per job setting x student x dataset x seed x test type (fractions);
  - `sweep.csv`: mean and std over seeds (in %) per setting x student x dataset x test type, plus
    `dataset = mean`: each seed's F1 averaged over the datasets first;
  - `f1_vs_<param>.png` per swept setting (`finetune.seed` is never an axis: seeds are what the
    error bars are over): x = the swept value (log scale for wide numeric ranges), one line per student
    arm (and per value of any other swept setting), error bars = std over seeds, test type `normal`,
    one panel per dataset plus the mean over datasets. Rows whose student is `teacher` (or
    `teacher-...`) are drawn as dashed horizontal reference lines, not as arms.

  The folder is logged to an MLflow run tagged `kind=sweep` in the jobs' experiment, with the swept
  settings as params and each job's flow run id as a tag.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

JOB_FILE = "fsa_job.json"
#: Swept settings that only add seeds: aggregated over (error bars), never a plot axis.
SEED_KEYS = frozenset({"finetune.seed", "finetune.seeds"})
MEAN_DATASET = "mean"


class _Tee:
    """A stdout stand-in that passes everything through and keeps the flow's result line."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.pending = ""
        self.result: dict[str, Any] | None = None

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._inspect(line)
        return self.stream.write(text)

    def _inspect(self, line: str) -> None:
        line = line.strip()
        if not (line.startswith("{") and '"report"' in line):
            return
        try:
            value = json.loads(line)
        except ValueError:
            return
        if isinstance(value, dict) and "report" in value:
            self.result = value

    def finish(self) -> dict[str, Any] | None:
        self._inspect(self.pending)
        self.pending = ""
        return self.result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _multirun(config: DictConfig) -> bool:
    from hydra.types import RunMode

    return OmegaConf.select(config, "hydra.mode", default=None) == RunMode.MULTIRUN


def _select(config: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(config, key, throw_on_missing=False)
    except Exception:  # an unresolvable interpolation: recorded as unknown
        return None


class SweepReport(Callback):
    """Collects each multirun job's report and writes the sweep report when the multirun ends."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._tee: _Tee | None = None
        self._started = 0.0
        self._records: list[Path] = []  # job records written in this process (the basic launcher)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.time()
        self._records = []

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not (self.enabled and _multirun(config)):
            return
        self._tee = _Tee(sys.stdout)
        sys.stdout = self._tee

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        tee, self._tee = self._tee, None
        if tee is None:
            return
        if sys.stdout is tee:
            sys.stdout = tee.stream
        printed = tee.finish()
        out_dir = Path(str(config.hydra.runtime.output_dir))
        written = out_dir / "result.json"
        result = json.loads(written.read_text()) if written.is_file() else printed
        status = getattr(getattr(job_return, "status", None), "name", None)
        result = result or {}
        record = {
            "num": _select(config, "hydra.job.num"),
            "overrides": list(getattr(job_return, "overrides", None) or _select(config, "hydra.overrides.task") or []),
            "status": status,
            "report": result.get("report"),
            "parent_run_id": result.get("parent_run_id"),
            # a job run elsewhere (hydra/launcher=prefect) reports where its flow ran: the deployment's
            # workdir and MLflow, which this machine's config need not name
            "workdir": result.get("workdir") or _select(config, "workdir"),
            "tracking_uri": result.get("tracking_uri") or _select(config, "tracking.uri"),
            "experiment": result.get("experiment") or _select(config, "tracking.experiment"),
        }
        (out_dir / JOB_FILE).write_text(json.dumps(record, indent=1, default=str))
        self._records.append(out_dir / JOB_FILE)
        if status == "FAILED":
            # Hydra's basic sweeper raises on a failed job and never calls on_multirun_end: write the
            # report of the jobs so far now, so the finished ones are not lost.
            self._write(config, partial=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        if OmegaConf.select(config, "hydra.launcher.wait", default=None) is False:
            # hydra/launcher=prefect without --wait: the jobs were only submitted, there is nothing to report yet
            print("sweep report: none (the jobs were submitted as flow runs; --wait collects them into one)",
                  file=sys.stderr)  # fmt: skip
            return
        self._write(config, partial=False)

    def _write(self, config: DictConfig, partial: bool) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        overrides = [str(o) for o in OmegaConf.to_container(config.hydra.overrides.task, resolve=False)]
        # jobs run here, else (launchers in other processes) the records under the sweep dir; a reused
        # sweep dir may hold records of an earlier multirun: only this one's jobs count
        found = self._records or [p for p in sweep_dir.rglob(JOB_FILE) if p.stat().st_mtime >= self._started - 1]
        jobs = sorted((json.loads(p.read_text()) for p in found), key=lambda job: int(job.get("num") or 0))
        if not jobs:
            log.warning("sweep report: no job records (%s) under %s", JOB_FILE, sweep_dir)
            return
        jobs = [job for job in jobs if job.get("report")]  # a failed job has no report to read
        out = sweep_dir / "report"
        keys = swept_keys(overrides)
        summary = write_sweep_report(jobs, keys, out) if jobs else None
        if summary is None:
            log.warning("sweep report: no finished job under %s", sweep_dir)
            return
        if not partial:
            log_sweep(jobs, keys, out, sweep_dir)
        what = "partial sweep report (a job failed)" if partial else "sweep report"
        print(f"{what}: {out}\n{sweep_table(summary, [k for k in keys if k not in SEED_KEYS])}", file=sys.stderr)
        print(json.dumps({"sweep_report": str(out)}))


def sweep_table(summary: Any, params: list[str]) -> str:
    """The sweep at a glance, for the terminal: test F1 (normal) mean ± std over seeds per setting and arm.

    With several datasets only their mean is shown (`dataset = mean`); sweep.csv has every row.
    """
    rows = summary[summary.test_type == "normal"]
    if (rows.dataset == MEAN_DATASET).any():
        rows = rows[rows.dataset == MEAN_DATASET]
    header = [*params, "student", "dataset", "F1 (%)", "seeds"]
    lines = [header]
    for row in rows.to_dict(orient="records"):
        f1 = f"{row['f1_mean']:.2f} ± {row['f1_std']:.2f}"
        lines.append(
            [*(str(row[p]) for p in params), str(row["student"]), str(row["dataset"]), f1, str(row["n_seeds"])]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)


def swept_keys(overrides: list[str]) -> list[str]:
    """The keys of the sweep overrides (`finetune.train_fraction=0.5,1.0`, `range(...)`, ...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return list(dict.fromkeys(o.key_or_group for o in parsed if o.is_sweep_override()))


def job_values(overrides: list[str], keys: list[str]) -> dict[str, Any]:
    """The job's value of each swept key (numbers as numbers, a group choice as its name)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    values: dict[str, Any] = {}
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.key_or_group in keys:
            values[o.key_or_group] = o.value()
    return values


def collect(jobs: list[dict[str, Any]], keys: list[str]) -> Any:
    """One row per job setting x student x dataset x seed x test type, from each job's `per_seed.csv`."""
    import pandas as pd

    frames = []
    for job in jobs:
        if not job.get("report"):
            raise ValueError(f"sweep report: job {job.get('num')} ({job.get('overrides')}) has no report")
        per_seed = pd.read_csv(Path(job["report"]) / "per_seed.csv")
        for key, value in job_values(job["overrides"], keys).items():
            if key not in SEED_KEYS:
                per_seed[key] = value
        frames.append(per_seed)
    table = pd.concat(frames, ignore_index=True)
    params = [k for k in keys if k not in SEED_KEYS]
    return table.drop_duplicates([*params, "student", "dataset", "seed", "test_type"], keep="last")


def aggregate(per_seed: Any, params: list[str]) -> Any:
    """Mean and std over seeds (in %, std 0 for one seed), with the over-datasets mean as `dataset = mean`."""
    import pandas as pd

    metrics = ["precision", "recall", "f1"]
    over = [*params, "student", "test_type", "seed"]
    mean_rows = per_seed.groupby(over, sort=False, dropna=False)[metrics].mean().reset_index()
    mean_rows["dataset"] = MEAN_DATASET
    both = pd.concat([per_seed, mean_rows], ignore_index=True) if per_seed.dataset.nunique() > 1 else per_seed
    grouped = both.groupby([*params, "student", "dataset", "test_type"], sort=False, dropna=False)
    out = grouped[metrics].agg(["mean", "std"]).mul(100)
    out.columns = [f"{metric}_{stat}" for metric, stat in out.columns]
    out = out.fillna(0.0)
    out["n_seeds"] = grouped.size()
    return out.reset_index()


def _is_reference(student: str) -> bool:
    return student == "teacher" or student.startswith("teacher-")


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def plot(summary: Any, param: str, others: list[str], path: Path) -> None:
    """F1 against `param`: one panel per dataset (test type `normal`), one line per arm (x other settings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test_type = "normal" if "normal" in set(summary.test_type) else summary.test_type.iloc[0]
    data = summary[summary.test_type == test_type]
    datasets = [d for d in dict.fromkeys(data.dataset) if d != MEAN_DATASET]
    if MEAN_DATASET in set(data.dataset):
        datasets.append(MEAN_DATASET)
    numeric = _numeric(list(data[param]))
    if not numeric:  # group choices, null: evenly spaced categories
        data = data.assign(**{param: data[param].astype(str)})
    xs_all = list(dict.fromkeys(data[param]))
    if numeric:
        xs_all = sorted(xs_all)
        positive = [x for x in xs_all if x > 0]
        log_x = len(positive) == len(xs_all) and len(xs_all) > 1 and max(xs_all) / min(xs_all) >= 20
    else:
        log_x = False
    position = {x: (x if numeric else i) for i, x in enumerate(xs_all)}
    cols = min(len(datasets), 3)
    rows = math.ceil(len(datasets) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, dataset in zip(axes.flat, datasets, strict=False):
        part = data[data.dataset == dataset]
        line_keys = ["student", *others]
        for values, line in part.groupby(line_keys, sort=False, dropna=False):
            values = values if isinstance(values, tuple) else (values,)
            line = line.sort_values(param, key=lambda s: s.map(position))
            extra = [f"{k.split('.')[-1]}={v}" for k, v in zip(others, values[1:], strict=True)]
            label = ", ".join([str(values[0]), *extra])
            if _is_reference(str(values[0])):
                ax.axhline(line.f1_mean.mean(), linestyle="--", color="grey", label=label)
                continue
            ax.errorbar(
                [position[x] for x in line[param]], line.f1_mean, yerr=line.f1_std, marker="o", capsize=3, label=label
            )
        ax.set_title(dataset if dataset != MEAN_DATASET else "mean over datasets", fontsize=9)
        ax.set_xlabel(param)
        ax.set_ylabel(f"F1 (%), {test_type}")
        if log_x:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(xs_all)), [str(x) for x in xs_all])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(datasets) :]:
        ax.set_visible(False)
    fig.suptitle(f"Test F1 vs {param}, mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_name(param: str, params: list[str]) -> str:
    """`f1_vs_<leaf>.png`, or the whole key (dots as underscores) when two swept keys share a leaf."""
    leaf = param.split(".")[-1]
    unique = sum(p.split(".")[-1] == leaf for p in params) == 1
    return f"f1_vs_{leaf if unique else param.replace('.', '_')}.png"


def write_sweep_report(jobs: list[dict[str, Any]], keys: list[str], out: Path) -> Any:
    """Write `sweep_per_seed.csv`, `sweep.csv` and one `f1_vs_<param>.png` per swept setting into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    params = [k for k in keys if k not in SEED_KEYS]
    per_seed = collect(jobs, keys)
    summary = aggregate(per_seed, params)
    per_seed.to_csv(out / "sweep_per_seed.csv", index=False)
    summary.to_csv(out / "sweep.csv", index=False)
    for param in params:
        plot(summary, param, [p for p in params if p != param], out / plot_name(param, params))
    return summary


def log_sweep(jobs: list[dict[str, Any]], keys: list[str], out: Path, sweep_dir: Path) -> str | None:
    """Log the sweep report folder to an MLflow run tagged `kind=sweep` in the jobs' experiment."""
    first = jobs[0]
    if not first.get("tracking_uri"):
        log.warning("sweep report: no tracking URI recorded; not logged to MLflow")
        return None
    from fsa_distill.flows.tracking import Tracker

    workdir = Path(first["workdir"]).resolve() if first.get("workdir") else None
    tracker = Tracker(first["tracking_uri"], first["experiment"], workdir / "mlartifacts" if workdir else None)
    values: dict[str, list[Any]] = {}
    for job in jobs:
        for key, value in job_values(job["overrides"], keys).items():
            values.setdefault(key, []).append(value)
    tags = {
        "kind": "sweep",
        "sweep_dir": str(sweep_dir),
        **{f"job.{job['num']}.parent_run_id": str(job.get("parent_run_id")) for job in jobs},
    }
    run = tracker.start(
        f"sweep-{'-'.join(k.split('.')[-1] for k in keys) or 'jobs'}",
        {**{f"sweep.{k}": json.dumps(v) for k, v in values.items()}, "sweep.jobs": str(len(jobs))},
        tags,
    )
    ok = False
    try:
        tracker.files(run, out, "sweep_report")
        ok = True
    finally:
        tracker.end(run, ok)
    return run
