"""The `openai` backend: any OpenAI-compatible `/v1/chat/completions` server (vllm serve, OpenAI, ...).

Requests run concurrently (at most `teacher.concurrency` in flight), each with a timeout.
Transient failures (HTTP 408, 409, 425, 429, 5xx, timeouts, dropped connections) are retried with
exponential backoff and jitter, waiting at least as long as the server's `Retry-After` (seconds
or an HTTP date), for as long as the pair's retry budget allows (`teacher.retry_budget_s`: the
total seconds one pair may wait between its attempts); past it the shard fails with a
`TransientError`, so Prefect retries it later instead of caching a shard of failures. Every
finished pair is reported to `done` as it finishes: the generate stage checkpoints it, so a
retried shard sends only the pairs not yet answered. A malformed reply (bad JSON, no choices) is
retried up to `teacher.max_retries` times and then recorded with finish_reason "error". The API
key is read from the environment variable named by `teacher.api_key_env`; it is never put into
params, logs, artifacts or exception messages, and URLs in messages are redacted
(`fsa_distill.redact`).

`label_logprobs` scores label words by the first output token's top logprobs (one 1-token request
per prompt, through the same client); a server that returns no logprobs gives None for the prompt.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from math import inf
from typing import Any

import httpx
from fsa_distill.tasks.teachers.common import Generation, Pair, sha256_text

from fsa_distill.errors import InputError, TransientError
from fsa_distill.progress import Progress
from fsa_distill.redact import redact_text, redact_url

log = logging.getLogger(__name__)


class _RedactURLs(logging.Filter):
    """Redact URLs in httpx's own request log ("HTTP Request: POST <url> ..."): it prints the full URL."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact_text(record.getMessage()), None
        return True


if not any(isinstance(f, _RedactURLs) for f in logging.getLogger("httpx").filters):
    logging.getLogger("httpx").addFilter(_RedactURLs())
#: Each pair's request is independent (its own seed): finished pairs can be checkpointed and skipped on resume.
PAIRWISE = True
MAX_BACKOFF_S = 30.0
DEFAULT_RETRY_BUDGET_S = 120.0
#: Statuses another attempt may fix: request timeout, conflict, too early, rate limit (and every 5xx).
TRANSIENT = {408, 409, 425, 429}
#: Statuses that mean this request (not the configuration) was refused: recorded as an error.
REJECTED = {400, 413, 422}
#: Statuses that mean the configuration is wrong (key, URL, model name): fail at once.
FATAL = {401, 403, 404}


class Malformed(ValueError):
    """A 200 reply that is not a chat completion."""


class _Retry(Exception):
    """A failed attempt that another attempt may fix."""

    def __init__(self, kind: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.retry_after = retry_after


def api_key(teacher: dict[str, Any]) -> str | None:
    """The key from the environment variable named by `teacher.api_key_env` (unset: no key)."""
    name = teacher.get("api_key_env")
    return os.environ.get(name) or None if name else None


def scrub(text: str, key: str | None) -> str:
    """Remove the key and URL credentials from a message that may echo a request (belt and braces)."""
    text = redact_text(text)
    return text.replace(key, "***") if key else text


def request_body(pair: Pair, teacher: dict[str, Any]) -> dict[str, Any]:
    """The chat-completion request for one pair; greedy decoding is temperature 0."""
    body: dict[str, Any] = {
        "model": teacher["model"],
        "messages": pair.messages(),
        "max_tokens": teacher["max_new_tokens"],
    }
    if teacher["do_sample"]:
        body.update(temperature=teacher["temperature"], top_p=teacher["top_p"], seed=teacher["seed"] + pair.index)
    else:
        body.update(temperature=0.0)
    return body


def parse_reply(payload: Any) -> tuple[str, str, int | None, int | None]:
    """(text, finish_reason, prompt_tokens, output_tokens) of a chat completion, else `Malformed`."""
    try:
        choice = payload["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise Malformed(f"no choices[0].message.content ({type(exc).__name__}: {exc})") from None
    if not isinstance(text, str):
        raise Malformed(f"choices[0].message.content is {type(text).__name__}, not a string")
    reason = choice.get("finish_reason")
    usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
    return (
        text,
        reason if reason in ("stop", "length") else "error",
        usage.get("prompt_tokens"),
        usage.get("completion_tokens"),
    )


def backoff(attempt: int, base_s: float, retry_after: float | None) -> float:
    """Exponential backoff with jitter (capped at MAX_BACKOFF_S); a server's Retry-After is a floor.

    Retry-After is not capped here: the retry budget decides whether waiting that long is allowed.
    """
    delay = random.uniform(0.5, 1.0) * min(MAX_BACKOFF_S, base_s * 2**attempt)
    return max(delay, retry_after or 0.0)


def retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """A Retry-After header in seconds: delta-seconds, or an HTTP date (RFC 9110 10.2.3); else None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class Client:
    """Sends a shard's requests with bounded concurrency and counts what went wrong."""

    def __init__(self, teacher: dict[str, Any], done: Callable[[Pair, Generation], None] | None = None) -> None:
        if not teacher.get("base_url"):
            raise InputError(
                "teacher.base_url is not set (the OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1)"
            )
        self.teacher = teacher
        self.url = redact_url(teacher["base_url"])  # for messages
        self.key = api_key(teacher)
        self.stats: Counter[str] = Counter()
        self.done = done
        self.progress: Progress | None = None  # counts finished requests when set

    async def run(self, pairs: list[Pair]) -> list[Generation]:
        """Every pair's generation, in order."""
        return await self.gather(lambda http, semaphore: [self.one(http, semaphore, p) for p in pairs])

    async def gather(self, make: Callable[[httpx.AsyncClient, asyncio.Semaphore], list[Awaitable[Any]]]) -> list[Any]:
        """Await the requests `make(http, semaphore)` returns, at most `teacher.concurrency` in flight; in order."""
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        limit = max(1, int(self.teacher["concurrency"]))
        semaphore = asyncio.Semaphore(limit)
        async with (
            httpx.AsyncClient(
                base_url=self.teacher["base_url"].rstrip("/") + "/",
                headers=headers,
                timeout=httpx.Timeout(self.teacher["timeout_s"]),
                limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
            ) as http,
            asyncio.TaskGroup() as group,
        ):  # one fatal failure cancels the rest
            tasks = [group.create_task(c) for c in make(http, semaphore)]
        return [t.result() for t in tasks]

    async def one(self, http: httpx.AsyncClient, semaphore: asyncio.Semaphore, pair: Pair) -> Generation:
        """One pair with retries; reported to `done` once it has its final answer."""
        generation = await self._one(http, semaphore, pair)
        if self.done is not None:
            self.done(pair, generation)
        if self.progress is not None:
            self.progress.update(1, tokens=generation.output_tokens)
        return generation

    async def _one(self, http: httpx.AsyncClient, semaphore: asyncio.Semaphore, pair: Pair) -> Generation:
        body = request_body(pair, self.teacher)
        digest = sha256_text(json.dumps(body["messages"], ensure_ascii=False, sort_keys=True))
        try:
            (text, reason, n_in, n_out), latency = await self.send(
                http, semaphore, body, f"pair {pair.index} (review {pair.review_id})", parse_reply
            )
        except _GaveUp:
            return Generation(digest, "", "error", 0, 0, 0.0)
        if reason == "error":
            self.stats["errors"] += 1
        return Generation(digest, text.strip(), reason, n_in or 0, n_out or 0, latency)

    async def send(
        self,
        http: httpx.AsyncClient,
        semaphore: asyncio.Semaphore,
        body: dict[str, Any],
        what: str,
        parse: Callable[[Any], Any],
    ) -> tuple[Any, float]:
        """POST one request with retries: (`parse` of the reply, seconds of the attempt that got it).

        Raises `_GaveUp` (counted as an error) when the request is refused or malformed on every
        allowed attempt, `TransientError` past the retry budget, `InputError` on a fatal status.
        """
        max_malformed = int(self.teacher["max_retries"])
        base_s = float(self.teacher.get("backoff_s", 0.5))
        budget = self.teacher.get("retry_budget_s")
        budget_s = DEFAULT_RETRY_BUDGET_S if budget is None else float(budget)
        self.stats["requests"] += 1
        waited = 0.0  # seconds slept before retries: queueing behind other requests does not count
        malformed = 0
        attempt = 0
        while True:
            try:
                async with semaphore:
                    began = time.perf_counter()
                    reply = await self.attempt(http, body, parse)
                    latency = time.perf_counter() - began
            except _Retry as exc:
                self.stats[exc.kind] += 1
                if exc.kind == "malformed":
                    malformed += 1
                    if malformed > max_malformed:  # the server answers, just not usefully for this request
                        self.stats["errors"] += 1
                        log.warning("%s: malformed reply after %d attempts", what, malformed)
                        raise _GaveUp from None
                delay = backoff(attempt, base_s, exc.retry_after)
                if waited + delay > budget_s:
                    raise TransientError(
                        f"{self.url}: request for {what} failed {attempt + 1} times, {waited:.1f} s waited "
                        f"(retry budget {budget_s:g} s"
                        + (f", server asked to wait {exc.retry_after:g} s" if exc.retry_after else "")
                        + "); last: "
                        + scrub(str(exc), self.key)
                    ) from None
                self.stats["retries"] += 1
                attempt += 1
                waited += delay
                await asyncio.sleep(delay)
                continue
            except _Rejected as exc:
                self.stats["errors"] += 1
                self.stats["rejected"] += 1
                log.warning("%s rejected: %s", what, exc)
                raise _GaveUp from None
            return reply, latency

    async def attempt(
        self, http: httpx.AsyncClient, body: dict[str, Any], parse: Callable[[Any], Any] = parse_reply
    ) -> Any:
        """One HTTP round trip, classified: a reply (`parse`d), a `_Retry`, a `_Rejected` or a fatal `InputError`."""
        try:
            response = await http.post("chat/completions", json=body)
        except httpx.TimeoutException as exc:
            raise _Retry("timeouts", f"timeout after {self.teacher['timeout_s']} s ({type(exc).__name__})") from None
        except httpx.TransportError as exc:  # refused, reset, closed without a reply
            raise _Retry("disconnects", f"{type(exc).__name__}: {scrub(str(exc), self.key)}") from None
        status = response.status_code
        if status in TRANSIENT or status >= 500:
            self.stats[f"http_{status}"] += 1
            raise _Retry("http_errors", f"HTTP {status}", retry_after_s(response.headers.get("retry-after")))
        if status in FATAL:
            what = "the API key" if status in (401, 403) else "the URL or model name"
            raise InputError(
                f"teacher: {self.url} answered HTTP {status}; check {what} "
                f"(key from ${self.teacher.get('api_key_env')}, model {self.teacher['model']!r})"
            )
        if status >= 400:
            self.stats[f"http_{status}"] += 1
            raise _Rejected(f"HTTP {status}: {scrub(response.text[:300], self.key)}")
        try:
            return parse(response.json())
        except (json.JSONDecodeError, UnicodeDecodeError, Malformed) as exc:
            raise _Retry("malformed", f"malformed reply: {scrub(str(exc), self.key)[:300]}") from None


class _Rejected(Exception):
    """The server refused this one request (e.g. the prompt exceeds its context)."""


class _GaveUp(Exception):
    """A request that failed for good without failing the run: refused, or malformed on every attempt."""


def _first(group: BaseExceptionGroup) -> BaseException:
    """The first leaf exception of a (nested) exception group."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def _stats(client: Client) -> dict[str, Any]:
    """The client's counts: the usual ones (0 when nothing happened) first, then any others."""
    stats = {k: client.stats.get(k, 0) for k in ("requests", "retries", "errors", "malformed", "timeouts")}
    stats.update({k: v for k, v in client.stats.items() if k not in stats})
    return stats


def generate(
    pairs: list[Pair], teacher: dict[str, Any], done: Callable[[Pair, Generation], None] | None = None
) -> tuple[list[Generation], dict[str, Any]]:
    """Generate every pair through the server; returns generations and counts of what went wrong.

    `done(pair, generation)` is called as each pair finishes (before the others): the stage's checkpoint.
    """
    client = Client(teacher, done)
    try:
        with Progress("generate", len(pairs), "pairs", rates=("tokens",)) as client.progress:
            generations = asyncio.run(client.run(pairs))
    except ExceptionGroup as group:  # the TaskGroup wraps failures; surface the first cause plainly
        raise _first(group) from None
    return generations, _stats(client)


#: Alternatives asked for at the first output token (the OpenAI API's maximum, vLLM's default limit).
TOP_LOGPROBS = 20


def logprobs_body(prompt: str, teacher: dict[str, Any]) -> dict[str, Any]:
    """A request for the first output token's top alternatives after `prompt` (one chat user message)."""
    return {
        "model": teacher["model"],
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": TOP_LOGPROBS,
    }


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_top_logprobs(payload: Any) -> list[tuple[str, float]] | None:
    """(token text, logprob) of the first output token's alternatives (the chosen token included).

    None when the reply carries no logprobs (`logprobs` missing or null, or no tokens in it); a reply
    without `choices[0]` is `Malformed`.
    """
    try:
        choice = payload["choices"][0]
    except (KeyError, IndexError, TypeError) as exc:
        raise Malformed(f"no choices[0] ({type(exc).__name__}: {exc})") from None
    if not isinstance(choice, dict):
        raise Malformed(f"choices[0] is {type(choice).__name__}, not an object")
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not content:
        return None
    first = content[0]
    if not isinstance(first, dict):
        raise Malformed(f"choices[0].logprobs.content[0] is {type(first).__name__}, not an object")
    top = first.get("top_logprobs") or []
    if not isinstance(top, list):
        raise Malformed(f"choices[0].logprobs.content[0].top_logprobs is {type(top).__name__}, not a list")
    entries = [first, *top]
    return [
        (e["token"], float(e["logprob"]))
        for e in entries
        if isinstance(e, dict) and isinstance(e.get("token"), str) and _number(e.get("logprob"))
    ]


def token_text(token: str) -> str:
    """A returned token as label text: byte-level (`Ġ`) and SentencePiece (`▁`) space marks as spaces,
    stripped, lower-cased."""
    return token.replace("\u0120", " ").replace("\u2581", " ").strip().lower()


def label_scores(top: list[tuple[str, float]], label_words: list[str]) -> list[float]:
    """Each label word's best logprob among the tokens whose text is a non-empty prefix of the word
    (`" pos"` and `"Positive"` both count for `positive`); -inf where none is."""
    words = [w.strip().lower() for w in label_words]
    scores = [-inf] * len(words)
    for token, logprob in top:
        text = token_text(token)
        if not text:
            continue
        for j, word in enumerate(words):
            if word.startswith(text) and logprob > scores[j]:
                scores[j] = logprob
    return scores


def label_logprobs(
    prompts: list[str], teacher: dict[str, Any], label_words: list[str]
) -> tuple[list[list[float] | None], dict[str, Any]]:
    """Each label word's logprob as the teacher's first output token after each prompt (`label_scores`).

    One greedy request per prompt for one token with its top `TOP_LOGPROBS` alternatives, sent with
    the same retries, retry budget and concurrency as generation. A prompt gets None where the server
    returns no logprobs (it does not support them) or refused the request or answered it malformed
    on every attempt (counted in `errors`); the caller decides how to classify those. Stats count
    requests and failures as `generate` does, plus `with_logprobs` and `without_logprobs` prompts.
    """
    client = Client(teacher)

    async def one(http: httpx.AsyncClient, semaphore: asyncio.Semaphore, i: int) -> list[tuple[str, float]] | None:
        try:
            top, _ = await client.send(http, semaphore, logprobs_body(prompts[i], teacher), f"prompt {i}",
                                       parse_top_logprobs)  # fmt: skip
        except _GaveUp:
            top = None
        if client.progress is not None:
            client.progress.update()
        return top

    try:
        with Progress("label scoring", len(prompts), "sentences") as client.progress:
            tops = asyncio.run(client.gather(lambda http, sem: [one(http, sem, i) for i in range(len(prompts))]))
    except ExceptionGroup as group:
        raise _first(group) from None
    scores = [None if top is None else label_scores(top, list(label_words)) for top in tops]
    stats = _stats(client)
    stats["with_logprobs"] = sum(s is not None for s in scores)
    stats["without_logprobs"] = len(scores) - stats["with_logprobs"]
    return scores, stats
