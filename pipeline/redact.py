"""Redaction of secrets from anything vaepipe writes: params, configs, checkpoints, prints.

Three kinds of secret are recognised wherever they appear in a string: the password of a
URL's userinfo (``scheme://user:***@host``, which covers DSNs such as
``postgresql://user:pw@host/db``), ``name=value`` pairs whose name says credential
(``?token=...``, ``&X-Amz-Signature=...``, libpq's ``password=...``), and the current
values of the secret environment variables below (plus Ray's auth token file).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

REDACTED = "***"

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN")
"""Environment variables whose values are secrets wherever they show up."""

MIN_SECRET_LEN = 8
"""Shorter env values are not searched for: replacing a 3-letter value everywhere would mangle
paths in saved configs (those still appear redacted in URLs and ``password=`` pairs)."""

_USERINFO = re.compile(r"""(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*):(?P<pw>[^\s'"<>]*)@""")
_PAIR = re.compile(r"(?P<name>(?<![\w.\-])[\w.\-]+)=(?P<value>[^&\s#;,'\"]+)")
SECRET_WORDS = {"token", "password", "passwd", "pwd", "secret", "key", "apikey", "signature", "sig",
                "credential", "credentials", "auth"}
"""A key (config key, query or DSN parameter) is secret when one of its ``_.-`` parts is one of these."""


def is_secret_name(name: str) -> bool:
    return any(part in SECRET_WORDS for part in re.split(r"[_.\-]", name.lower()))


def secret_values() -> list[str]:
    """Current values of the secret env vars and of Ray's auth token file, longest first."""
    values = [os.environ.get(name, "") for name in SECRET_ENV]
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        values.append(token_file.read_text().strip())
    except OSError:
        pass
    return sorted({v for v in values if len(v) >= MIN_SECRET_LEN}, key=len, reverse=True)


def redact_text(s: str, secrets: Optional[list[str]] = None) -> str:
    """``s`` with URL passwords, credential pairs and secret env values replaced by ``***``.

    ``secrets``: the env values to look for (default: ``secret_values()`` now)."""
    for value in secret_values() if secrets is None else secrets:
        s = s.replace(value, REDACTED)
    s = _USERINFO.sub(lambda m: f"{m['head']}:{REDACTED}@" if m["pw"] else m[0], s)
    return _PAIR.sub(lambda m: f"{m['name']}={REDACTED}" if is_secret_name(m["name"]) else m[0], s)


def redact_config_dict(d: Any, secrets: Optional[list[str]] = None) -> Any:
    """A copy of a plain config dict (nested dicts/lists) with every string redacted, and the
    value of any key named like a credential (``password``, ``api_key``...) replaced whole."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(d, dict):
        return {k: REDACTED if _is_secret_leaf(k, v) else redact_config_dict(v, secrets) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return type(d)(redact_config_dict(v, secrets) for v in d)
    return redact_text(d, secrets) if isinstance(d, str) else d


def _is_secret_leaf(key: Any, value: Any) -> bool:
    return is_secret_name(str(key)) and isinstance(value, (str, int, float)) and value != ""


def is_redacted(s: str | None) -> bool:
    """Whether ``s`` went through redaction (and so cannot serve as a live URI or address)."""
    return bool(s) and REDACTED in s
