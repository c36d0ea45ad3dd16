"""Keeping secrets out of what a run shows: the config it serves and stores, and its log lines.

Two maskings, for two uses. :func:`redact_config` hides every value whose key names a secret
(and a URL's password), for the API, W&B and the config the run publishes. :func:`mask_url`
hides only a URL's password, for log lines and for the config a run directory keeps to compare
a resumed run's against (there, hiding settings such as ``learner.token_pass`` by their name
would let a change of them through unnoticed).
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Sequence
from typing import Any

__all__ = ["REDACTED", "mask_url", "redact_config"]

REDACTED = "<redacted>"
_URL_MASK = "***"
# Keys whose every value is a secret, whatever its type (a YAML password can parse as a number).
_ALWAYS_SECRET = re.compile(r"password|passwd|secret|credential|authorization", re.IGNORECASE)
# Keys that name a secret when they hold text: "hf_token", "api_key". Numbers under such keys are
# settings ("token_init", "max_new_tokens") and stay visible.
_TEXT_SECRET = re.compile(r"token|key", re.IGNORECASE)
# The password in a URL's userinfo (``redis://user:pw@host``), wherever the URL sits.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:)[^/@\s]+(?=@)")


def mask_url(url: str | None) -> str:
    """``url`` with the password of its userinfo replaced by ``***`` (for logs and messages)."""
    if not url:
        return str(url)
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{_URL_MASK}@{host}"))


def _finite(value: Any) -> Any:
    # The result is served as JSON, which cannot carry NaN or +-inf.
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _mask(value: Any, text_only: bool) -> Any:
    """``value`` with every secret leaf replaced; None stays None (it says "not set")."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: _mask(v, text_only) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, text_only) for v in value]
    if text_only and isinstance(value, (bool, int, float)):
        return _finite(value)
    return REDACTED


def redact_config(
    config: Any, known_secrets: Sequence[str] = (), path: str = ""
) -> tuple[Any, list[str]]:
    """``config`` with secrets replaced by :data:`REDACTED`, and the dotted paths replaced.

    A value is a secret when its key contains ``password``, ``passwd``, ``secret``,
    ``credential`` or ``authorization`` (any type), or ``token`` or ``key`` (text only: numbers
    under such keys are settings like ``token_init``), case-insensitively; or when it is a
    string equal to one of ``known_secrets`` wherever it sits; a URL keeps its shape with only
    the password of its userinfo replaced (``redis://:<redacted>@host``). The API runs this
    again over the config the run published, so a secret that slipped into a new field is
    still not served.
    """
    secrets = {s for s in known_secrets if s}
    if isinstance(config, dict):
        out: dict[str, Any] = {}
        paths: list[str] = []
        for key, value in config.items():
            sub = f"{path}.{key}" if path else str(key)
            if _ALWAYS_SECRET.search(str(key)) or _TEXT_SECRET.search(str(key)):
                masked = _mask(value, text_only=not _ALWAYS_SECRET.search(str(key)))
                if masked != value:
                    paths.append(sub)
                out[key] = masked
                continue
            out[key], inner = redact_config(value, tuple(secrets), sub)
            paths.extend(inner)
        return out, paths
    if isinstance(config, list):
        items, paths = [], []
        for i, value in enumerate(config):
            item, inner = redact_config(value, tuple(secrets), f"{path}[{i}]")
            items.append(item)
            paths.extend(inner)
        return items, paths
    if isinstance(config, str):
        if config in secrets:
            return REDACTED, [path]
        masked = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, config)
        return masked, [path] if masked != config else []
    return _finite(config), []
