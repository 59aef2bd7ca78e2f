"""The report's tables, from per-seed scores: what a reader of `summary.md` sees."""

from __future__ import annotations

import pandas as pd
from fsa_distill.tasks.report import delta_markdown, deltas, summarise


def _per_seed() -> pd.DataFrame:
    rows = []
    for seed, (base_f1, distill_f1) in zip((42, 52), ((0.20, 0.30), (0.22, 0.26)), strict=True):
        for student, f1 in (("baseline", base_f1), ("distill", distill_f1)):
            rows.append(dict(student=student, dataset="acsa/laptop16", seed=seed, test_type="normal",
                             precision=f1, recall=f1, f1=f1))  # fmt: skip
            rows.append(dict(student=student, dataset="acsa/laptop16", seed=seed, test_type="mams",
                             precision=0.1, recall=0.1, f1=0.1))  # fmt: skip
    # the teacher's seeded sample held no `mams` sentence: scored on `normal` only
    rows.append(dict(student="teacher-k4", dataset="acsa/laptop16", seed=42, test_type="normal",
                     precision=0.05, recall=0.05, f1=0.05))  # fmt: skip
    rows.append(dict(student="teacher-k4", dataset="acsa/laptop16", seed=42, test_type="mams",
                     precision=float("nan"), recall=float("nan"), f1=float("nan")))  # fmt: skip
    return pd.DataFrame(rows)


def test_differences_to_the_baseline_show_a_dash_where_a_model_has_no_score():
    delta = deltas(summarise(_per_seed()))
    table = delta_markdown(delta)
    assert "nan" not in table
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert rows["distill"] == "| distill | +7.00 | +0.00 |"  # (0.30 + 0.26)/2 - (0.20 + 0.22)/2
    assert rows["teacher-k4"] == "| teacher-k4 | -16.00 | – |"
