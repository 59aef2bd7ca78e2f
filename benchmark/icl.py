"""In-context prompting of a causal LLM: demonstrations, prompts and label extraction (no torch here).

Reproduces the prompt protocol of HITSZ-HLT/Sentiment-Distillation (`fsa.py` for the FSA
benchmark, `icl_multifaced.py` for sentiment classification):

    {instruction}\\n\\nSentence: {demo 1}\\nLabel: {label 1}\\n\\n ... Sentence: {test}\\nLabel:

- Demonstrations come from the dataset's train split, drawn per test example in test-file order
  with `random.Random(seed)` then `rng.sample(pool, k)`: without replacement inside one prompt,
  independently across prompts, unbalanced; the same stream as upstream's `random.seed(seed)` +
  `random.sample`. k = 0 gives the instruction and the test sentence only.
- One deliberate difference for FSA: upstream writes labels as Python lists of tuples
  (`[('food', 'positive')]`, `[]` when empty) and parses them with `ast.literal_eval`. The issue
  mandates the benchmark's own target format, so a demonstration's label is
  `benchmark.protocol.make_target` (`term | polarity ; term | polarity`, empty when there is no pair)
  and a prediction is parsed and scored by `benchmark.protocol` exactly like a student's. An empty
  label is written `Label:` with no trailing space.
- The instructions are versioned in `conf/icl/` (FSA) and with the sentiment datasets (sentiment);
  the template version and text belong in the cache key of any result built from these prompts.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fsa_distill.benchmark.protocol import TASKS, category_label, make_target

from fsa_distill import CONF_DIR

T = TypeVar("T")

LABEL_MARK = "Label:"
SENTENCE_MARK = "Sentence:"
CATEGORIES = "{categories}"
DEFAULT_K = 4
DEFAULT_SEEDS: tuple[int, ...] = (42, 52, 62)
#: The FSA instruction templates in use (conf/icl/<version>.yaml).
DEFAULT_TEMPLATES = CONF_DIR / "icl" / "v1.yaml"


def load_templates(path: str | Path = DEFAULT_TEMPLATES) -> dict[str, Any]:
    """The versioned FSA templates `{"version": ..., "fsa": {"atsa": ..., "acsa": ...}}`, checked.

    The whole dict (version and texts) is what an ICL result's cache key should hold.
    """
    import yaml

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not data.get("version"):
        raise ValueError(f"{path}: an ICL template file needs a non-empty `version`")
    fsa = data.get("fsa") or {}
    missing = [task for task in TASKS if not isinstance(fsa.get(task), str) or not fsa[task].strip()]
    if missing:
        raise ValueError(f"{path}: missing FSA instruction for {', '.join(missing)}")
    return data


def sample_demos(pool: Sequence[T], n_tests: int, k: int, seed: int) -> list[list[T]]:
    """k demonstrations per test example, in test order: `rng.sample(pool, k)` each, as upstream.

    One generator for the whole test file, so the demos of example i depend on the seed and i only.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k > len(pool):
        raise ValueError(f"k = {k} demonstrations but the pool has only {len(pool)} examples")
    rng = random.Random(seed)
    return [rng.sample(pool, k) for _ in range(n_tests)]


def build_prompt(instruction: str, demos: Sequence[tuple[str, str]], sentence: str) -> str:
    """Upstream's layout from (sentence, label) demos: the exact string the model continues."""
    parts = [instruction, ""]
    for demo_sentence, label in demos:
        label_line = f"{LABEL_MARK} {label}" if label else LABEL_MARK
        parts.append(f"{SENTENCE_MARK} {demo_sentence}\n{label_line}\n")
    parts.append(f"{SENTENCE_MARK} {sentence}\n{LABEL_MARK}")
    return "\n".join(parts)


def fsa_instruction(template: str, pool: Iterable[Mapping[str, Any]]) -> str:
    """The instruction text: `{categories}` (ACSA) becomes the pool's category labels as a Python list.

    Upstream lists the rest16 categories by hand; listing those of the demonstration pool (the
    train split) does the same for every dataset without looking at the test set.
    """
    if CATEGORIES not in template:
        return template
    labels = sorted({category_label(a["category"]) for row in pool for a in row["aspects"] if a.get("category")})
    return template.replace(CATEGORIES, repr(labels))


def fsa_prompt(instruction: str, task: str, demos: Sequence[Mapping[str, Any]], sentence: str) -> str:
    """One FSA prompt; each demo row (raw record or acquired row) is labelled by `make_target`."""
    return build_prompt(instruction, [(d["sentence"], make_target(task, d["aspects"])) for d in demos], sentence)


def sentiment_prompt(instruction: str, demos: Sequence[Mapping[str, Any]], sentence: str) -> str:
    """One sentiment prompt; a demo's label is `label.lower()`, as upstream."""
    return build_prompt(instruction, [(d["sentence"], str(d["label"]).lower()) for d in demos], sentence)


def fsa_prompts(
    template: str,
    task: str,
    tests: Sequence[Mapping[str, Any]],
    pool: Sequence[Mapping[str, Any]],
    k: int = DEFAULT_K,
    seed: int = 42,
) -> list[str]:
    """The prompt of every test row, in order, for one seed (pool = the dataset's train split)."""
    instruction = fsa_instruction(template, pool)
    demos = sample_demos(pool, len(tests), k, seed)
    return [fsa_prompt(instruction, task, d, row["sentence"]) for row, d in zip(tests, demos, strict=True)]


def sentiment_prompts(
    instruction: str,
    tests: Sequence[Mapping[str, Any]],
    pool: Sequence[Mapping[str, Any]],
    k: int = 0,
    seed: int = 42,
) -> list[str]:
    """The prompt of every test row, in order, for one seed (k = 0: zero-shot, the issue's default)."""
    demos = sample_demos(pool, len(tests), k, seed)
    return [sentiment_prompt(instruction, d, row["sentence"]) for row, d in zip(tests, demos, strict=True)]


def extract_label(continuation: str) -> str:
    """The predicted label in what the model wrote after the prompt's final `Label:`.

    Pass the continuation only (the generated tokens, decoded), not prompt + continuation. The
    prompt's last `Label:` is the test slot, so the label is the text right after it up to the end
    of its line. As upstream's regex (`Label:\\s*(.*?)(?=\\s*(?=Sentence:|\\n|$))` taken at the test
    slot), leading whitespace and blank lines are skipped (the first non-empty line is the label),
    and the label stops at a newline or at a `Sentence:` on the same line. Decisions beyond upstream:
    - a line that repeats the marker (`Label: food | positive`) is read after its last `Label:`
      (before any `Sentence:` on it);
    - later lines, including a `Label:` of a demonstration the model invents after its answer, are
      ignored (upstream reads the (k+1)-th `Label:` of the full text, never a later one);
    - a line that is only the marker (`Label:` then the answer on the next line) is skipped, as
      upstream's `Label:\\s*` skips the newline;
    - a continuation with nothing but whitespace gives "" (no pair: right for an empty gold).
    """
    for line in continuation.split("\n"):
        if not line.strip():
            continue
        line = line.split(SENTENCE_MARK, 1)[0]
        label = line.rsplit(LABEL_MARK, 1)[-1].strip()
        if not label and LABEL_MARK in line:
            continue  # the marker alone: the answer is on a following line
        return label
    return ""
