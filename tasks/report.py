"""Stage `report`: mean ± std over seeds per student × dataset × test type, as CSV, Markdown and PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from fsa_distill.artifacts import Artifact
from tasks.stage import stage


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
                    **{k: values[k] for k in ("precision", "recall", "f1")},
                }
            )
    return pd.DataFrame(rows)


def summarise(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (0 for one seed) of P/R/F1 in percent, over seeds."""
    grouped = per_seed.groupby(["student", "dataset", "test_type"], sort=False)
    out = grouped[["precision", "recall", "f1"]].agg(["mean", "std"]).mul(100)
    out.columns = [f"{metric}_{stat}" for metric, stat in out.columns]
    out = out.fillna(0.0)
    out["n_seeds"] = grouped.size()
    return out.reset_index()


def markdown_table(summary: pd.DataFrame) -> str:
    """F1 (mean ± std) with datasets × test types as columns and students as rows."""
    cell = summary.assign(value=summary.f1_mean.map("{:.2f}".format) + " ± " + summary.f1_std.map("{:.2f}".format))
    wide = cell.pivot(index="student", columns=["dataset", "test_type"], values="value")
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


@stage("report")
def report(out: Path, *, results: list[dict[str, Any]]) -> None:
    """Write `per_seed.csv`, `summary.csv`, `summary.md` and `f1.png`."""
    per_seed = collect(results)
    summary = summarise(per_seed)
    per_seed.to_csv(out / "per_seed.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(markdown_table(summary))
    chart(summary, out / "f1.png")
