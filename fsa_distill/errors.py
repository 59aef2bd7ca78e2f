"""Errors that tell a user what to fix, and the line between transient and deterministic failures."""

from __future__ import annotations

import socket
import urllib.error


class InputError(ValueError):
    """Bad input data or configuration: retrying cannot help; the message names file, row and problem."""


class TransientError(RuntimeError):
    """A failure worth retrying (network hiccup, server 5xx/429)."""


TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    TransientError,
    ConnectionError,
    TimeoutError,
    socket.timeout,
    urllib.error.URLError,
)


def is_transient(exc: BaseException | None) -> bool:
    """Whether a stage that failed with `exc` should be retried."""
    if exc is None or isinstance(exc, InputError):
        return False
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code == 429 or exc.code >= 500
    return isinstance(exc, TRANSIENT_TYPES)
