"""Credentials travel in environment variables, never inside a URI that gets printed or saved.

The driver moves ``user:password@`` out of the tracking URI into MLflow's own
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, and hands those variables to
Ray actors in a ``WorkerEnv``: an object whose ``str``/``repr`` names the variables but not
their values, so Ray Train's run state (which stringifies ``train_loop_config``) and our own
configs, params and checkpoints never hold them.
"""

from __future__ import annotations

import os
from typing import Optional
from urllib.parse import unquote, urlsplit, urlunsplit

CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                  "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_CLIENT_CERT_PATH", "MLFLOW_TRACKING_SERVER_CERT_PATH")
"""What a worker needs to reach the tracking server the driver reached."""


def split_userinfo(uri: str) -> tuple[str, Optional[str], Optional[str]]:
    """``(uri without user:password@, user, password)``; user and password are URL-decoded."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), unquote(user), unquote(password) if sep else None


def move_userinfo_to_env(uri: str) -> str:
    """Strip ``user:password@`` from an http(s) tracking URI into MLflow's basic-auth env vars.

    Database URIs (``postgresql://user:pw@host/db``) keep theirs: SQLAlchemy has no other way
    to receive it; they are redacted wherever they are written instead.
    """
    if not uri.startswith(("http://", "https://")):
        return uri
    clean, user, password = split_userinfo(uri)
    if user:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
    if password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    if os.environ.get("MLFLOW_TRACKING_URI") == uri:  # Ray workers started later inherit the env
        os.environ["MLFLOW_TRACKING_URI"] = clean
    return clean


class WorkerEnv:
    """Credential env vars captured in the driver and applied in a Ray actor."""

    def __init__(self, values: dict[str, str]):
        self._values = dict(values)

    @classmethod
    def capture(cls, tracking_uri: str) -> "WorkerEnv":
        """The driver's credential vars, and ``tracking_uri`` as the actor's MLFLOW_TRACKING_URI
        (a database URI keeps its password: it goes here, not into the config)."""
        return cls({**{k: os.environ[k] for k in CREDENTIAL_ENV if os.environ.get(k)}, "MLFLOW_TRACKING_URI": tracking_uri})

    @property
    def tracking_uri(self) -> str:
        return self._values["MLFLOW_TRACKING_URI"]

    def apply(self) -> None:
        os.environ.update(self._values)

    def __repr__(self) -> str:
        return f"WorkerEnv({', '.join(sorted(self._values))})"

    __str__ = __repr__
