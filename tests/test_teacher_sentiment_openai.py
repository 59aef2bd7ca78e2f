"""`teacher_sentiment` through the `openai` backend: label words scored by the first output token's
top logprobs where the server returns them, generate-and-match where it does not, and the method
recorded in metrics.json.

Upstream is a stub that knows each prompt's gold label (and answers it, as logprobs or as text), or
the real `vllm serve` SmolLM2 (needs the vllm environment, as tests/test_generate_openai.py).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fsa_distill.benchmark.classify import inputs as sentiment_inputs
from fsa_distill.tasks.teacher_sentiment import teacher_sentiment
from fsa_distill.tasks.teachers.openai_compat import TOP_LOGPROBS, label_scores, parse_top_logprobs

from fsa_distill.config import compose_config
from tests.conftest import shrunk
from tests.test_generate_openai import proxy_factory  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow]
N = 6


class LabelStub(ThreadingHTTPServer):
    """A stand-in OpenAI-compatible server that knows the gold label of every prompt (`gold`).

    A request with `logprobs: true` for a prompt in `with_logprobs` gets the first token's top
    logprobs, with the gold label's prefix on top; any other request gets no logprobs (the field is
    `null`, or left out when `omit`) and the text "The sentiment is <Gold>.".
    """

    daemon_threads = True

    def __init__(self, gold: dict[str, str], with_logprobs: set[str], omit: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _LabelHandler)
        self.gold = gold
        self.with_logprobs = with_logprobs
        self.omit = omit
        self.lock = threading.Lock()
        self.received: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def top_tokens(gold: str) -> list[dict]:
    """The first token's alternatives for a sentence labelled `gold` (negative/positive).

    " Pos" and "neg" are prefixes of a label word in another case and spacing; "Negatively" and
    "The" are not (a word is no prefix of a shorter label), so they score nothing.
    """
    if gold == "positive":
        tokens = [("Negatively", -0.05), (" Pos", -0.2), ("The", -1.9), ("neg", -2.5), (" negative", -4.0)]
    else:
        tokens = [(" Neg", -0.1), ("positive", -1.5), ("It", -2.0), (" p", -3.0)]
    return [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in tokens]


#: What label_scores makes of `top_tokens` ([negative, positive]).
EXPECTED = {"positive": [-2.5, -0.2], "negative": [-0.1, -1.5]}


class _LabelHandler(BaseHTTPRequestHandler):
    server: LabelStub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        prompt = request["messages"][-1]["content"]
        gold = self.server.gold[prompt]
        with self.server.lock:
            self.server.received.append(request)
        choice: dict = {"index": 0, "finish_reason": "stop"}
        if request.get("logprobs") and prompt in self.server.with_logprobs:
            top = top_tokens(gold)
            choice["message"] = {"role": "assistant", "content": top[0]["token"]}
            choice["logprobs"] = {"content": [{**top[0], "top_logprobs": top[: request["top_logprobs"]]}]}
        else:
            choice["message"] = {"role": "assistant", "content": f"The sentiment is {gold.capitalize()}."}
            if not self.server.omit:
                choice["logprobs"] = None
        body = json.dumps({"id": "stub", "object": "chat.completion", "choices": [choice]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def stubs() -> Iterator:
    started: list[LabelStub] = []

    def make(gold: dict[str, str], with_logprobs: set[str], omit: bool = False) -> LabelStub:
        stub = LabelStub(gold, with_logprobs, omit)
        threading.Thread(target=stub.serve_forever, daemon=True).start()
        started.append(stub)
        return stub

    yield make
    for stub in started:
        stub.shutdown()
        stub.server_close()


def config(workdir: Path, url: str, *extra: str) -> dict:
    return compose_config(
        shrunk(workdir, "teacher=openai", f"teacher.base_url={url}", f"zeroshot.sample={N}",
               "zeroshot.datasets=[sst2]", "teacher.backoff_s=0.01", *extra)
    )  # fmt: skip


def gold_prompts(cfg: dict) -> dict[str, str]:
    """The gold label of each prompt the stage will send (the same seeded sample and prompts)."""
    params = teacher_sentiment.params(cfg, dataset="sst2", seed=42)
    _, rows, prompts = sentiment_inputs(params["settings"], "sst2", 42)
    assert len(rows) == N and len({r["label"] for r in rows}) == 2  # both labels in the sample
    return {p: r["label"] for p, r in zip(prompts, rows, strict=True)}


def run_stage(store: Path, cfg: dict) -> tuple[dict, list[dict], Path]:
    art = teacher_sentiment.run(store, teacher_sentiment.params(cfg, dataset="sst2", seed=42))
    folder = Path(art.path)
    metrics = json.loads((folder / "metrics.json").read_text())
    return metrics, pq.read_table(folder / "predictions.parquet").to_pylist(), folder


def test_label_scores_take_the_best_prefix_token():
    labels = ["negative", "positive", "neutral"]
    top = [("Ġneg", -0.4), ("▁Neu", -2.0), (" ne", -0.5), ("", -0.1), ("  ", -0.1), ("positives", -0.2)]
    assert label_scores(top, labels) == [-0.4, -math.inf, -0.5]  # " ne" is a prefix of both ne- words
    alternatives = [{"token": "A", "logprob": -1}, {"token": "B", "logprob": "x"}, {"token": None, "logprob": -2}]
    payload = {"choices": [{"logprobs": {"content": [{"token": "A", "logprob": -1, "top_logprobs": alternatives}]}}]}
    assert parse_top_logprobs(payload) == [("A", -1.0), ("A", -1.0)]
    for missing in ({"choices": [{}]}, {"choices": [{"logprobs": None}]}, {"choices": [{"logprobs": {"content": []}}]}):
        assert parse_top_logprobs(missing) is None


def test_a_server_with_logprobs_is_scored_by_them(tmp_path, stubs):
    cfg = config(tmp_path, "http://127.0.0.1:1/v1")
    gold = gold_prompts(cfg)
    stub = stubs(gold, set(gold))
    metrics, rows, folder = run_stage(tmp_path / "store", config(tmp_path, stub.url))
    assert metrics["method"] == "logprobs" and metrics["n"] == N
    assert metrics["n_logprobs"] == N and metrics["n_generate_match"] == 0 and metrics["n_no_logprobs"] == 0
    assert metrics["accuracy"] == 1.0 and metrics["invalid"] == 0
    assert [r["prediction"] for r in rows] == [r["gold"] for r in rows]
    assert [r["scores"] for r in rows] == [EXPECTED[r["gold"]] for r in rows]
    # one 1-token greedy request per sentence, asking for the top logprobs; nothing generated
    assert len(stub.received) == N
    assert all(
        r["logprobs"] is True and r["top_logprobs"] == TOP_LOGPROBS and r["max_tokens"] == 1 and r["temperature"] == 0
        for r in stub.received
    )
    stats = json.loads((folder / "measured" / "label_logprobs.json").read_text())
    assert stats["with_logprobs"] == N and stats["without_logprobs"] == 0 and stats["requests"] == N


def test_a_server_without_logprobs_falls_back_to_generate_and_match(tmp_path, stubs):
    cfg = config(tmp_path, "http://127.0.0.1:1/v1")
    gold = gold_prompts(cfg)
    for omit in (False, True):  # `logprobs: null`, and no `logprobs` field at all
        stub = stubs(gold, set(), omit=omit)
        metrics, rows, _ = run_stage(tmp_path / f"store-{omit}", config(tmp_path, stub.url))
        assert metrics["method"] == "generate_match"
        assert metrics["n_logprobs"] == 0 and metrics["n_generate_match"] == N and metrics["n_no_logprobs"] == N
        assert metrics["accuracy"] == 1.0
        assert [r["prediction"] for r in rows] == [r["gold"] for r in rows]
        assert all(r["scores"] == [] and r["answer"].startswith("The sentiment is") for r in rows)
        asked = [r for r in stub.received if r.get("logprobs")]
        generated = [r for r in stub.received if not r.get("logprobs")]
        assert len(asked) == N and len(generated) == N and all(r["max_tokens"] == 8 for r in generated)


def test_some_prompts_without_logprobs_mix_the_methods_through_retries(tmp_path, stubs, proxy_factory):  # noqa: F811
    cfg = config(tmp_path, "http://127.0.0.1:1/v1")
    gold = gold_prompts(cfg)
    scored = set(list(gold)[:2])
    stub = stubs(gold, scored)
    proxy = proxy_factory(stub.url.removesuffix("/v1"), ["500", "429"])  # the first two requests fail once
    metrics, rows, folder = run_stage(tmp_path / "store", config(tmp_path, proxy.url))
    assert metrics["method"] == "logprobs+generate_match"
    assert metrics["n_logprobs"] == 2 and metrics["n_generate_match"] == N - 2
    assert [r["prediction"] for r in rows] == [r["gold"] for r in rows]
    prompts = list(gold)
    assert [bool(r["scores"]) for r in rows] == [p in scored for p in prompts]
    stats = json.loads((folder / "measured" / "label_logprobs.json").read_text())
    assert stats["retries"] == 2 and stats["http_500"] == 1 and stats["http_429"] == 1
    assert stats["with_logprobs"] == 2 and stats["requests"] == N


def test_a_label_word_missing_from_the_top_tokens_falls_back(tmp_path, stubs, monkeypatch):
    """No label word among a prompt's top tokens: generate and match, not an argmax of -infs."""
    cfg = config(tmp_path, "http://127.0.0.1:1/v1")
    gold = gold_prompts(cfg)
    original = top_tokens

    def without_labels(label: str) -> list[dict]:
        return [{"token": "The", "logprob": -0.3}] if label == "positive" else original(label)

    monkeypatch.setattr(f"{__name__}.top_tokens", without_labels)
    stub = stubs(gold, set(gold))
    metrics, rows, _ = run_stage(tmp_path / "store", config(tmp_path, stub.url))
    n_positive = sum(g == "positive" for g in gold.values())
    assert metrics["method"] == "logprobs+generate_match" and metrics["n_generate_match"] == n_positive
    assert metrics["n_no_logprobs"] == 0 and metrics["accuracy"] == 1.0
    assert all((r["scores"] == []) == (r["gold"] == "positive") for r in rows)
