"""Stage `report`: mean ± std over seeds per student × dataset × test type, as CSV, Markdown and PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from fsa_distill.tasks.stage import stage

from fsa_distill.artifacts import Artifact


def collect(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (student, dataset, seed, test type) from evaluation artifacts."""
    rows = []
    for result in results:
        art: Artifact = result["evaluation"]
        metrics = json.loads((Path(art.path) / "metrics.json").read_text())
        for test_type, values in metrics.items():
            rows.append(
                {
                    "student": result["student"],
                    "dataset": result["dataset"],
                    "seed": result["seed"],
                    "test_type": test_type,
                    **{k: float("nan") if values[k] is None else values[k] for k in ("precision", "recall", "f1")},
                }
            )
    return pd.DataFrame(rows)


def summarise(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (0 for one seed) of P/R/F1 in percent, over seeds."""
    grouped = per_seed.groupby(["student", "dataset", "test_type"], sort=False)
    out = grouped[["precision", "recall", "f1"]].agg(["mean", "std"]).mul(100)
    out.columns = [f"{metric}_{stat}" for metric, stat in out.columns]
    std = [c for c in out.columns if c.endswith("_std")]
    out[std] = out[std].fillna(0.0)  # one seed: no spread; a mean stays NaN where nothing was scored
    out["n_seeds"] = grouped.size()
    return out.reset_index()


def markdown_table(summary: pd.DataFrame) -> str:
    """F1 (mean ± std) with datasets × test types as columns and students as rows."""
    value = summary.f1_mean.map("{:.2f}".format) + " ± " + summary.f1_std.map("{:.2f}".format)
    cell = summary.assign(value=value.where(summary.f1_mean.notna(), "–"))
    return _wide_markdown(cell)


def _wide_markdown(cell: pd.DataFrame) -> str:
    """Students as rows, dataset × test type as columns, `value` in the cells."""
    wide = cell.pivot(index="student", columns=["dataset", "test_type"], values="value")
    wide = wide.reindex(list(dict.fromkeys(cell.student)))
    header = "| student | " + " | ".join(f"{d} {t}" for d, t in wide.columns) + " |"
    sep = "|---|" + "---|" * len(wide.columns)
    lines = [header, sep]
    for student, row in wide.iterrows():
        lines.append(f"| {student} | " + " | ".join(str(v) for v in row.to_numpy()) + " |")
    return "\n".join(lines) + "\n"


def chart(summary: pd.DataFrame, path: Path) -> None:
    """Grouped bars: F1 per dataset/test type, one bar per student, std as error bars."""
    labels = list(dict.fromkeys(summary.dataset + "\n" + summary.test_type))
    students = list(dict.fromkeys(summary.student))
    width = 0.8 / max(len(students), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4))
    for i, student in enumerate(students):
        part = summary[summary.student == student]
        pos = {lab: j for j, lab in enumerate(labels)}
        xs = [pos[d + "\n" + t] + i * width for d, t in zip(part.dataset, part.test_type, strict=True)]
        ax.bar(xs, part.f1_mean, width, yerr=part.f1_std, label=student, capsize=2)
    ax.set_xticks([j + width * (len(students) - 1) / 2 for j in range(len(labels))], labels, fontsize=7)
    ax.set_ylabel("F1 (%)")
    ax.set_title("Test F1, mean ± std over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def deltas(summary: pd.DataFrame, baseline: str = "baseline") -> pd.DataFrame:
    """F1 difference (points) of every other student against `baseline`, per dataset and test type."""
    if baseline not in set(summary.student):
        return pd.DataFrame(columns=["student", "dataset", "test_type", "f1_delta"])
    base = summary[summary.student == baseline].set_index(["dataset", "test_type"]).f1_mean
    others = summary[summary.student != baseline].copy()
    others["f1_delta"] = (
        others.f1_mean.to_numpy() - base.reindex(list(zip(others.dataset, others.test_type, strict=True))).to_numpy()
    )
    return others[["student", "dataset", "test_type", "f1_delta"]].reset_index(drop=True)


def delta_markdown(delta: pd.DataFrame) -> str:
    """The F1 differences as a Markdown table; "–" where a model has no score for that test type
    (a teacher's seeded sample can hold no `mams` sentence), never "+nan"."""
    cells = delta.assign(value=[("–" if pd.isna(v) else f"{v:+.2f}") for v in delta.f1_delta])
    return _wide_markdown(cells)


def corpus_markdown(stats: dict[str, Any]) -> str:
    """The distillation corpus: generated, kept, dropped per rule, tokens."""
    lines = ["| corpus | count |", "|---|---|"]
    for key in ("generated", "kept", "output_tokens_kept", "review_chars_kept"):
        if key in stats:
            lines.append(f"| {key} | {stats[key]} |")
    for rule, n in stats.get("dropped", {}).items():
        lines.append(f"| dropped: {rule} | {n} |")
    return "\n".join(lines) + "\n"


def collect_sentiment(sentiment: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (model, sentiment set, seed) from zero-shot evaluations: macro-F1, accuracy, size."""
    rows = []
    for result in sentiment:
        metrics = json.loads((Path(result["evaluation"].path) / "metrics.json").read_text())
        rows.append(
            {"student": result["student"], "dataset": result["dataset"], "seed": result["seed"],
             "macro_f1": metrics["macro_f1"], "accuracy": metrics["accuracy"], "n": metrics["n"],
             "method": metrics.get("method", "")}
        )  # fmt: skip
    return pd.DataFrame(rows, columns=["student", "dataset", "seed", "macro_f1", "accuracy", "n", "method"])


def leaderboard(summary: pd.DataFrame, sentiment: pd.DataFrame) -> pd.DataFrame:
    """Rows: the teacher (per k) and each student arm; columns: FSA F1 (normal, hard) and sentiment
    macro-F1 per set, in percent, as "mean ± std" over seeds ("–" where a model was not scored)."""
    cells: dict[str, dict[str, str]] = {}

    def put(model: str, column: str, mean: float, std: float) -> None:
        cells.setdefault(model, {})[column] = "–" if mean != mean else f"{mean:.2f} ± {std:.2f}"

    for r in summary[summary.test_type.isin(["normal", "hard"])].itertuples():
        put(r.student, f"{r.dataset} {r.test_type}", r.f1_mean, r.f1_std)
    if len(sentiment):
        grouped = sentiment.groupby(["student", "dataset"], sort=False).macro_f1
        for (model, dataset), values in grouped:
            put(model, f"{dataset} macro-F1", 100 * values.mean(), 100 * (values.std() if len(values) > 1 else 0.0))
    columns = list(dict.fromkeys(c for row in cells.values() for c in row))
    fsa = [c for c in columns if not c.endswith("macro-F1")]
    ordered = sorted(fsa, key=lambda c: (c.rsplit(" ", 1)[0], c.endswith("hard"))) + [
        c for c in columns if c.endswith("macro-F1")
    ]
    models = sorted(cells, key=lambda m: (not m.startswith("teacher"), m != "baseline", m))
    table = pd.DataFrame([[cells[m].get(c, "–") for c in ordered] for m in models], index=models, columns=ordered)
    table.index.name = "model"
    return table.reset_index()


def _markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


@stage("report")
def report(
    out: Path,
    *,
    results: list[dict[str, Any]],
    corpus: Artifact | None = None,
    sentiment: list[dict[str, Any]] | None = None,
    samples: dict[str, Any] | None = None,
) -> None:
    """Write `per_seed.csv`, `summary.csv`, `deltas.csv`, `leaderboard.csv`, `summary.md` and `f1.png`."""
    per_seed = collect(results)
    summary = summarise(per_seed)
    delta = deltas(summary)
    per_seed.to_csv(out / "per_seed.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    delta.to_csv(out / "deltas.csv", index=False)
    senti = collect_sentiment(sentiment or [])
    senti.to_csv(out / "sentiment.csv", index=False)
    board = leaderboard(summary, senti)
    board.to_csv(out / "leaderboard.csv", index=False)
    text = "## Leaderboard\n\nFSA test F1 (%) and sentiment macro-F1 (%), mean ± std over seeds.\n\n" + _markdown(board)
    notes = [f"- {k}: {v}" for k, v in (samples or {}).items() if v]
    if notes:
        text += "\nScored on seeded samples (per dataset):\n" + "\n".join(notes) + "\n"
    text += "\n## Test F1 (%), mean ± std over seeds\n\n" + markdown_table(summary)
    if len(delta):
        text += "\n## F1 difference to the baseline (points)\n\n" + delta_markdown(delta)
    if corpus is not None:
        stats = json.loads((Path(corpus.path) / "stats.json").read_text())
        (out / "corpus_stats.json").write_text(json.dumps(stats, indent=1))
        text += "\n## Distillation corpus\n\n" + corpus_markdown(stats)
    (out / "summary.md").write_text(text)
    chart(summary, out / "f1.png")


@report.configure
def params(
    cfg: dict[str, Any],
    *,
    results: list[dict[str, Any]],
    corpus: Artifact | None = None,
    sentiment: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The evaluations to summarise (by content), the corpus whose statistics the report shows, and
    the sample sizes the report must state."""
    samples = {
        "teacher in-context FSA sentences": cfg["teacher_eval"]["sample"]
        if cfg["teacher_eval"]["enabled"] and cfg["teacher"]["backend"] != "released"
        else None,
        "sentiment test sentences": cfg["zeroshot"]["sample"] if cfg["zeroshot"]["enabled"] else None,
    }
    return {"results": results, "corpus": corpus, "sentiment": sentiment or [], "samples": samples}
