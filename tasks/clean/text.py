"""Text rules of the clean stage as plain functions: chatty preambles and trailers, refusals,
truncation, the analysis answer format, and the normalisation exact dedup compares."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from typing import Any

_CHATTY = r"(?:sure|certainly|of course|absolutely|okay|ok|alright)"
# "here is the rewritten review", "below is my analysis": an announcement names what follows
_ANNOUNCE = (
    r"(?:here(?:'s| is| are)|below is|below are|this is)\b[^\n:]{0,80}?"
    r"\b(?:rewrit\w*|re-written|revis\w*|review|version|analysis|output|answer|response|result|breakdown)s?\b"
    r"[^\n:]{0,60}?"
)
_LABEL = r"(?:output|answer|response|rewrite|rewritten review|revised review|rewritten version|analysis)"
_PREAMBLES = [
    # a whole first line that announces the answer: "Sure, here is the rewritten review:", "Output:"
    re.compile(
        rf"\A[ \t]*(?:{_CHATTY}\b[^\n]{{0,80}}?|(?:{_CHATTY}[,!.]?[ \t]+)?{_ANNOUNCE}|{_LABEL}[ \t]*|review[ \t]*)"
        r":[ \t]*(?:\n|\Z)",
        re.IGNORECASE,
    ),
    # the same announcement inline: "Here's the rewritten review: I ...", "Rewritten review: I ..."
    re.compile(rf"\A[ \t]*(?:(?:{_CHATTY}[,!.]?[ \t]+)?{_ANNOUNCE}|{_LABEL}[ \t]*):[ \t]*", re.IGNORECASE),
    # a bare "Sure!" / "Certainly." before the answer
    re.compile(rf"\A[ \t]*{_CHATTY}[!.][ \t]*\n?", re.IGNORECASE),
]
_CONFIDENCE_LINE = re.compile(
    r"^[ \t]*[(\[]?[ \t]*\**confidence(?:[ \t]+(?:rating|level|score))?\**[ \t]*[:=-][ \t]*\d{1,3}(?:\.\d+)?[ \t]*%"
    r"[ \t]*[)\]]?[ \t]*$\n?",
    re.IGNORECASE | re.MULTILINE,
)
# Single words count only as a label ("Note:", "Confidence: 90%"); "Note that ..." is content.
_TRAILER_MARKER = (
    r"(?:(?:notes?|nb|n\.b\.|disclaimer|references?|reference\(s\)|sources?|confidence(?: rating| level| score)?"
    r"|response(?: format)?|explanation|corrections?|total)\**[ \t]*:"
    r"|note\b[^\n:]{0,40}:|please note\b|i hope (?:this|that) helps\b|let me know\b|feel free\b)"
)
# A line starting with a trailer marker, and the rest of its paragraph, at the very end of the text.
_TRAILER = re.compile(
    rf"\n[ \t]*(?:[(\[*_#>-]+[ \t]*)?{_TRAILER_MARKER}[^\n]*(?:\n(?![ \t]*\n)[^\n]*)*\s*\Z", re.IGNORECASE
)
_SEPARATOR_TAIL = re.compile(r"\n[ \t]*[-*=_.~#]{3,}[ \t]*\s*\Z")
_QUOTES = {'"': '"', "“": "”", "'": "'"}

_TASK_VERB = (
    r"(?:fulfill|comply|complete|assist|help(?! but)|provide|perform|process|analy[sz]e|rewrite|generate|create|"
    r"write|answer|do that|do this|engage|support|continue)"
)
_SORRY = r"(?:(?:i'?m|i am) sorry|sorry|i apologi[sz]e)"
_CANNOT = r"(?:cannot|can't|can not|am unable to|'m unable to|am not able to|won't be able to|will not|won't)"
_REFUSALS = [
    # "I'm sorry, but I can't fulfill ...", "Unfortunately, I am unable to provide ..."
    re.compile(
        rf"\A\W*(?:{_SORRY}|unfortunately)\b[^.!?\n]{{0,60}}?\bi {_CANNOT} {_TASK_VERB}\b",
        re.IGNORECASE,
    ),
    # "I'm sorry, but the review you provided ..."
    re.compile(
        rf"\A\W*{_SORRY},? but (?:the|this|your) (?:review|text|request|input|prompt)\b",
        re.IGNORECASE,
    ),
    re.compile(rf"\A\W*i {_CANNOT} {_TASK_VERB}\b", re.IGNORECASE),
]
# anywhere in the text; searched only when a cheap substring test finds "an ai" or "language model"
_AI_SELF = re.compile(r"\bas an ai\b(?!-)|\bas a(?:n ai)? language model\b|\bi(?:'m| am) an ai\b(?!-)", re.IGNORECASE)
_TERMINAL = re.compile(r"(?:[.!?…](?:[\"'”’)\]*_]*)|\S[\"”])\s*\Z")

_FIELD = re.compile(
    r"^[ \t]*(?:[-*•+][ \t]*|\d+[.)][ \t]*)?\**[ \t]*(opinion[ \t]+target|target|aspect|sentiment|reasoning)s?"
    r"(?:[ \t]*\d+)?[ \t]*\**[ \t]*:[ \t]*\**[ \t]*(.*)$",
    re.IGNORECASE,
)
_PLACEHOLDER = re.compile(
    r"^[\[(<{].*(?:fill|your own|insert|to be|placeholder|todo|tbd).*[\])>}]$|^<[^>]*>$", re.IGNORECASE
)
_MAX_SENTIMENT_CHARS = 60


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] == _QUOTES[text[0]] and text[0] not in text[1:-1]:
        return text[1:-1].strip()
    return text


def cut_preamble(text: str) -> str:
    """The text without a chatty opening ("Sure! Here's the rewritten review:") and its wrapping quotes."""
    cut = text
    for _ in range(3):
        before = cut
        for pattern in _PREAMBLES:
            match = pattern.match(cut)
            if match and match.end() < len(cut):
                cut = cut[match.end() :].lstrip()
                break
        if cut == before:
            break
    return _unquote(cut) if cut != text else text


def cut_trailers(text: str) -> str:
    """The text without `Confidence: 90%` lines and trailing notes, references and separators."""
    cut = _CONFIDENCE_LINE.sub("", text).rstrip()
    while True:
        match = _TRAILER.search(cut) or _SEPARATOR_TAIL.search(cut)
        if not match or not cut[: match.start()].strip():
            return cut
        cut = cut[: match.start()].rstrip()


def is_refusal(text: str) -> bool:
    """Whether the output declines the task ("I'm sorry, but I can't", "As an AI language model")."""
    if any(p.search(text) for p in _REFUSALS):
        return True
    low = text.lower()
    return ("an ai" in low or "language model" in low) and _AI_SELF.search(text) is not None


def is_truncated(text: str, finish_reason: str | None) -> bool:
    """Whether generation stopped early: a length/error finish, or no terminal punctuation or closing quote."""
    return finish_reason in ("length", "error") or not _TERMINAL.search(text.rstrip()[-12:])


def _field_value(value: str) -> str:
    value = value.strip().strip("*").strip()
    return _unquote(value)


_BLOCK_FIELDS = ("target", "aspect", "sentiment", "reasoning")


def _well_formed(block: dict[str, str]) -> dict[str, str] | None:
    fields = {k: block.get(k, "").strip() for k in _BLOCK_FIELDS}
    if (
        all(fields.values())
        and len(fields["sentiment"]) <= _MAX_SENTIMENT_CHARS
        and not any(_PLACEHOLDER.match(v) for v in fields.values())
    ):
        return fields
    return None


def _iter_blocks(text: str) -> Iterator[dict[str, str]]:
    """The well-formed blocks of an analysis answer, lazily (the rule stops at the first one)."""
    current: dict[str, str] = {}
    target = ""
    last: str | None = None
    for line in text.splitlines():
        match = _FIELD.match(line)
        if match:
            key = match.group(1).lower()
            key = "target" if key.endswith("target") else key
            value = _field_value(match.group(2))
            if key == "target" or (key == "aspect" and "aspect" in current) or not current:
                if current and (block := _well_formed(current)):
                    yield block
                target = value if key == "target" else target
                current = {"target": target, key: value}
            else:
                current[key] = value
            last = key
        elif not line.strip():
            last = None
        elif last is not None and current:
            current[last] = f"{current.get(last, '')} {line.strip()}".strip()
    if current and (block := _well_formed(current)):
        yield block


def parse_analysis(text: str) -> list[dict[str, Any]]:
    """The well-formed blocks of an analysis answer: dicts with index, target, aspect, sentiment, reasoning.

    A block starts at `Opinion Target N:` (or at an `Aspect:` line, which then inherits the last
    target); a field may continue on the next lines until a blank line. A block is well-formed when
    all four fields are non-empty, the sentiment is a short label and no field is a template
    placeholder such as "(your own analysis here)". Malformed blocks are left out.
    """
    return [{"index": i, **block} for i, block in enumerate(_iter_blocks(text), start=1)]


def has_analysis_block(text: str) -> bool:
    """Whether an analysis answer has at least one well-formed block (what the `unparseable` rule asks)."""
    return next(_iter_blocks(text), None) is not None


def normalise(text: str) -> str:
    """NFKC, case-folded, whitespace-collapsed text: what exact dedup compares."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())
