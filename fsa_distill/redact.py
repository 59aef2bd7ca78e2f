"""Keep credentials out of logs, error messages and tracked parameters.

A URL can carry a secret in two places: its userinfo (`https://user:token@host/...`,
`postgresql://user:password@db/mlflow`) and its query (`?api_key=...`, `?token=...`). `redact_url`
masks both as `***` and leaves everything else as written, so the message still says which server
it was; `redact_text` does the same for every URL inside a longer message; `redact_config` returns
a copy of a config whose URL values (`teacher.base_url`, `tracking.uri`, ...) are redacted.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit

MASK = "***"
#: Query parameter names (lower case, `-` read as `_`) whose values are secrets.
SECRET_PARAMS = frozenset(
    {
        "key",
        "api_key",
        "apikey",
        "access_key",
        "secret",
        "client_secret",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "auth",
        "authorization",
        "password",
        "passwd",
        "pwd",
        "sig",
        "signature",
        "x_amz_signature",
        "x_amz_credential",
        "x_amz_security_token",
        "session_token",
        "code",
    }
)
#: A URL inside free text: a scheme, `://`, then everything up to whitespace or a closing quote/bracket.
_URL_IN_TEXT = re.compile(r"""[A-Za-z][A-Za-z0-9+.\-]*://[^\s'"<>()\[\]{}]+""")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def _secret_name(name: str) -> bool:
    normalised = unquote(name).strip().lower().replace("-", "_")
    return normalised in SECRET_PARAMS or normalised.endswith(("_token", "_secret", "_password", "_key"))


def _redact_query(query: str) -> str:
    parts = []
    for part in query.split("&"):
        name, eq, value = part.partition("=")
        parts.append(f"{name}={MASK}" if eq and value and _secret_name(name) else part)
    return "&".join(parts)


def looks_like_url(value: str) -> bool:
    """Whether `value` starts with `scheme://`."""
    return bool(_SCHEME.match(value.strip()))


def redact_url(url: str) -> str:
    """`url` with its userinfo and secret-looking query values replaced by `***`.

    `https://user:pw@host:8443/v1?api_key=abc&x=1` -> `https://***@host:8443/v1?api_key=***&x=1`.
    Everything else is kept exactly as written (no re-encoding). A string that is not a URL comes
    back unchanged; one that cannot be parsed comes back as `***`.
    """
    if not isinstance(url, str) or not looks_like_url(url):
        return url
    try:
        urlsplit(url)  # the checks urlsplit makes (brackets of an IPv6 host, ...)
    except ValueError:  # say nothing rather than risk echoing a secret
        return MASK
    scheme, _, rest = url.partition("://")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, rest = rest[:end], rest[end:]
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rpartition("@")[2]
    rest, hash_, fragment = rest.partition("#")
    path, question, query = rest.partition("?")
    if query:
        query = _redact_query(query)
    if "=" in fragment:
        fragment = _redact_query(fragment)
    return f"{scheme}://{netloc}{path}{question}{query}{hash_}{fragment}"


def redact_text(text: str) -> str:
    """`text` with every URL in it redacted (`redact_url`)."""
    if not isinstance(text, str) or "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def redact_config(cfg: Any) -> Any:
    """A copy of `cfg` (nested dicts and lists) with every URL value redacted.

    Covers `teacher.base_url` and `tracking.uri` and any other string that is a URL: a URL with
    credentials in its userinfo or query is a secret wherever in the config it appears.
    """
    if isinstance(cfg, dict):
        return {k: redact_config(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return type(cfg)(redact_config(v) for v in cfg)
    if isinstance(cfg, str):
        return redact_text(cfg)
    return cfg
