"""Credentials stay out of messages and tracked params: URL redaction, the config check on
`teacher.api_key_env`, and MLflow params built by `flatten`."""

from __future__ import annotations

import copy

import pytest
from fsa_distill.flows.tracking import flatten

from fsa_distill.config import compose_config, validate
from fsa_distill.redact import redact_config, redact_text, redact_url
from tests.conftest import shrunk


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:pw@host:8443/v1?api_key=abc&x=1", "https://***@host:8443/v1?api_key=***&x=1"),
        ("https://ghp_tokenonly@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
        ("postgresql://mlflow:s3cret@db.internal:5432/mlflow", "postgresql://***@db.internal:5432/mlflow"),
        (
            "http://h/v1?token=t&key=k&password=p&sig=s&Access-Token=a",
            "http://h/v1?token=***&key=***&password=***&sig=***&Access-Token=***",
        ),
        (
            "https://s3.example/b/o?X-Amz-Signature=abc&X-Amz-Date=1",
            "https://s3.example/b/o?X-Amz-Signature=***&X-Amz-Date=1",
        ),
        ("https://h/cb#access_token=abc&state=1", "https://h/cb#access_token=***&state=1"),
        # nothing secret: unchanged, byte for byte
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("sqlite:////work/mlflow.db", "sqlite:////work/mlflow.db"),
        ("https://h/search?q=a%20b&page=2", "https://h/search?q=a%20b&page=2"),
        ("file:///tmp/mlruns", "file:///tmp/mlruns"),
        # not URLs at all
        ("OPENAI_API_KEY", "OPENAI_API_KEY"),
        ("user:pw@host", "user:pw@host"),
        ("", ""),
        # unparsable: masked whole rather than risk echoing it
        ("http://user:pw@[::1/v1", "***"),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_redact_text_finds_urls_inside_messages():
    message = "POST http://bob:pw123@10.0.0.1:8000/v1/chat/completions failed ('https://h/?api_key=zz'); retry"
    redacted = redact_text(message)
    assert "pw123" not in redacted and "zz" not in redacted
    assert redacted == "POST http://***@10.0.0.1:8000/v1/chat/completions failed ('https://h/?api_key=***'); retry"
    assert redact_text("no url here: user:pw") == "no url here: user:pw"


def test_redact_config_covers_base_url_tracking_uri_and_any_url():
    cfg = {
        "teacher": {"base_url": "https://u:key123@api.example/v1", "api_key_env": "OPENAI_API_KEY", "timeout_s": 1.0},
        "tracking": {"uri": "postgresql://ml:dbpass@db/mlflow", "experiment": "x"},
        "data": {"source": "https://mirror:mirrorpass@data.example/fsa", "datasets": ["atsa/rest14"]},
        "reviews": {"sources": [{"path": "https://h/r.parquet?token=tok"}]},
    }
    before = copy.deepcopy(cfg)
    redacted = redact_config(cfg)
    assert cfg == before  # a copy: the run still uses the real values
    text = repr(redacted)
    for secret in ("key123", "dbpass", "mirrorpass", "tok'"):
        assert secret not in text
    assert redacted["teacher"]["base_url"] == "https://***@api.example/v1"
    assert redacted["tracking"]["uri"] == "postgresql://***@db/mlflow"
    assert redacted["teacher"]["timeout_s"] == 1.0 and redacted["data"]["datasets"] == ["atsa/rest14"]


def test_flatten_never_puts_credentials_into_mlflow_params():
    params = flatten(
        "",
        {
            "tracking": {"uri": "http://admin:mlflowpw@mlflow.internal:5000"},
            "teacher": {"base_url": "https://u:k@api.example/v1?api_key=abc", "max_retries": 5},
            "sources": ["https://x:y@h/a", "plain"],
        },
    )
    assert params["tracking.uri"] == "http://***@mlflow.internal:5000"
    assert params["teacher.base_url"] == "https://***@api.example/v1?api_key=***"
    assert params["teacher.max_retries"] == "5"
    assert params["sources"] == '["https://***@h/a", "plain"]'
    assert not any(s in v for v in params.values() for s in ("mlflowpw", ":k@", "abc", "x:y"))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> dict:
    return compose_config(shrunk(tmp_path_factory.mktemp("work")))


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "_KEY", "key2", ""])
def test_api_key_env_accepts_variable_names(cfg, name):
    validate({**cfg, "teacher": {**cfg["teacher"], "api_key_env": name}})


@pytest.mark.parametrize(
    "value",
    ["sk-proj-AbC123xyz987secret", "Bearer abc123secret", "2KEY", "MY KEY", "$OPENAI_API_KEY", "key=abcsecret"],
)
def test_api_key_env_rejects_anything_else_without_echoing_it(cfg, value):
    with pytest.raises(ValueError, match=r"teacher\.api_key_env must be the NAME of an environment variable") as bad:
        validate({**cfg, "teacher": {**cfg["teacher"], "api_key_env": value}})
    assert value not in str(bad.value) and "secret" not in str(bad.value)


def test_a_pasted_key_fails_composition_without_echoing_it(tmp_path):
    with pytest.raises(ValueError, match="api_key_env") as bad:
        compose_config(shrunk(tmp_path, "teacher.api_key_env=sk-live-0123456789abcdef"))
    assert "sk-live-0123456789abcdef" not in str(bad.value)


def test_retry_budget_is_a_teacher_setting(cfg):
    assert cfg["teacher"]["retry_budget_s"] == 120.0
    with pytest.raises(ValueError, match="retry_budget_s must be >= 0"):
        validate({**cfg, "teacher": {**cfg["teacher"], "retry_budget_s": -1.0}})
