"""The `openai` backend: any OpenAI-compatible `/v1/chat/completions` server (vllm serve, OpenAI, ...).

Requests run concurrently (at most `teacher.concurrency` in flight), each with a timeout. 429,
5xx, timeouts and dropped connections are retried with exponential backoff and jitter; when a
pair still fails after `max_retries` retries the shard fails with a `TransientError`, so Prefect
retries it later instead of caching a shard of failures. A malformed reply (bad JSON, no
choices) is retried too and then recorded with finish_reason "error". The API key is read from
the environment variable named by `teacher.api_key_env`; it is never put into params, logs,
artifacts or exception messages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections import Counter
from typing import Any

import httpx
from fsa_distill.tasks.teachers.common import Generation, Pair, sha256_text

from fsa_distill.errors import InputError, TransientError

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 30.0
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
    """Remove the key from a message that may echo a request (belt and braces)."""
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
    """Exponential backoff with full jitter; a server's Retry-After is a floor (capped)."""
    delay = random.uniform(0.5, 1.0) * min(MAX_BACKOFF_S, base_s * 2**attempt)
    return max(delay, min(retry_after or 0.0, MAX_BACKOFF_S))


class Client:
    """Sends a shard's requests with bounded concurrency and counts what went wrong."""

    def __init__(self, teacher: dict[str, Any]) -> None:
        if not teacher.get("base_url"):
            raise InputError(
                "teacher.base_url is not set (the OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1)"
            )
        self.teacher = teacher
        self.key = api_key(teacher)
        self.stats: Counter[str] = Counter()

    async def run(self, pairs: list[Pair]) -> list[Generation]:
        """Every pair's generation, in order."""
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
            tasks = [group.create_task(self.one(http, semaphore, p)) for p in pairs]
        return [t.result() for t in tasks]

    async def one(self, http: httpx.AsyncClient, semaphore: asyncio.Semaphore, pair: Pair) -> Generation:
        """One pair with retries."""
        body = request_body(pair, self.teacher)
        digest = sha256_text(json.dumps(body["messages"], ensure_ascii=False, sort_keys=True))
        retries = int(self.teacher["max_retries"])
        base_s = float(self.teacher.get("backoff_s", 0.5))
        self.stats["requests"] += 1
        last: _Retry | None = None
        for attempt in range(retries + 1):
            if attempt:
                self.stats["retries"] += 1
                await asyncio.sleep(backoff(attempt - 1, base_s, last.retry_after if last else None))
            try:
                async with semaphore:
                    began = time.perf_counter()
                    text, reason, n_in, n_out = await self.attempt(http, body)
                    latency = time.perf_counter() - began
            except _Retry as exc:
                self.stats[exc.kind] += 1
                last = exc
                continue
            except _Rejected as exc:
                self.stats["errors"] += 1
                self.stats["rejected"] += 1
                log.warning("pair %d (review %s) rejected: %s", pair.index, pair.review_id, exc)
                return Generation(digest, "", "error", 0, 0, 0.0)
            if reason == "error":
                self.stats["errors"] += 1
            return Generation(digest, text.strip(), reason, n_in or 0, n_out or 0, latency)
        assert last is not None
        if last.kind == "malformed":  # the server answers, just not usefully for this pair: record it
            self.stats["errors"] += 1
            log.warning(
                "pair %d (review %s): malformed reply after %d attempts", pair.index, pair.review_id, retries + 1
            )
            return Generation(digest, "", "error", 0, 0, 0.0)
        raise TransientError(
            f"{self.teacher['base_url']}: request for pair {pair.index} failed {retries + 1} times; last: "
            + scrub(str(last), self.key)
        )

    async def attempt(self, http: httpx.AsyncClient, body: dict[str, Any]) -> tuple[str, str, int | None, int | None]:
        """One HTTP round trip, classified: a reply, a `_Retry`, a `_Rejected` or a fatal `InputError`."""
        try:
            response = await http.post("chat/completions", json=body)
        except httpx.TimeoutException as exc:
            raise _Retry("timeouts", f"timeout after {self.teacher['timeout_s']} s ({type(exc).__name__})") from None
        except httpx.TransportError as exc:  # refused, reset, closed without a reply
            raise _Retry("disconnects", f"{type(exc).__name__}: {scrub(str(exc), self.key)}") from None
        status = response.status_code
        if status == 429 or status >= 500:
            self.stats[f"http_{status}"] += 1
            raise _Retry("http_errors", f"HTTP {status}", _retry_after(response))
        if status in FATAL:
            what = "the API key" if status in (401, 403) else "the URL or model name"
            raise InputError(
                f"teacher: {self.teacher['base_url']} answered HTTP {status}; check {what} "
                f"(key from ${self.teacher.get('api_key_env')}, model {self.teacher['model']!r})"
            )
        if status >= 400:
            self.stats[f"http_{status}"] += 1
            raise _Rejected(f"HTTP {status}: {scrub(response.text[:300], self.key)}")
        try:
            return parse_reply(response.json())
        except (json.JSONDecodeError, UnicodeDecodeError, Malformed) as exc:
            raise _Retry("malformed", f"malformed reply: {scrub(str(exc), self.key)[:300]}") from None


class _Rejected(Exception):
    """The server refused this one request (e.g. the prompt exceeds its context)."""


def _retry_after(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds, if it is a number."""
    try:
        return float(response.headers.get("retry-after", ""))
    except ValueError:
        return None


def _first(group: BaseExceptionGroup) -> BaseException:
    """The first leaf exception of a (nested) exception group."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def generate(pairs: list[Pair], teacher: dict[str, Any]) -> tuple[list[Generation], dict[str, Any]]:
    """Generate every pair through the server; returns generations and counts of what went wrong."""
    client = Client(teacher)
    try:
        generations = asyncio.run(client.run(pairs))
    except ExceptionGroup as group:  # the TaskGroup wraps failures; surface the first cause plainly
        raise _first(group) from None
    stats = {k: client.stats.get(k, 0) for k in ("requests", "retries", "errors", "malformed", "timeouts")}
    stats.update({k: v for k, v in client.stats.items() if k not in stats})
    return generations, stats
