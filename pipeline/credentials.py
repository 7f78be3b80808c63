"""Credentials travel in environment variables, never inside a URI that gets printed or saved.

The driver moves ``user:password@`` out of the tracking URI into MLflow's own
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, and hands those variables to
Ray actors in a ``WorkerEnv``: an object whose ``str``/``repr`` names the variables but not
their values, so Ray Train's run state (which stringifies ``train_loop_config``) and our own
configs, params and checkpoints never hold them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                  "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_CLIENT_CERT_PATH", "MLFLOW_TRACKING_SERVER_CERT_PATH")
"""What a worker needs to reach the tracking server the driver reached."""

AWS_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")
"""The driver's AWS credentials, which Ray Tune hands to every trial. Tune does it by copying
them into each trial actor's ``runtime_env`` env_vars, and Ray's runtime-env agent writes those
in clear into the session's ``runtime_env_agent.log``; a sweep hands them over in a
``WorkerEnv`` instead (``kept_out_of_environ`` while Tune launches trials)."""

SWEEP_CREDENTIAL_ENV = CREDENTIAL_ENV + AWS_CREDENTIAL_ENV
"""What a sweep's trial, and the Train workers it starts, get from the sweep's driver."""


@contextmanager
def kept_out_of_environ(names: Sequence[str]) -> Iterator[None]:
    """``names`` are unset inside the block and restored after it."""
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


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
    def capture(cls, tracking_uri: str, names: Sequence[str] = CREDENTIAL_ENV) -> "WorkerEnv":
        """The driver's credential vars ``names``, and ``tracking_uri`` as the actor's
        MLFLOW_TRACKING_URI (a database URI keeps its password: it goes here, not into the config)."""
        return cls({**{k: os.environ[k] for k in names if os.environ.get(k)}, "MLFLOW_TRACKING_URI": tracking_uri})

    @property
    def tracking_uri(self) -> str:
        return self._values["MLFLOW_TRACKING_URI"]

    def apply(self) -> None:
        os.environ.update(self._values)

    def __repr__(self) -> str:
        return f"WorkerEnv({', '.join(sorted(self._values))})"

    __str__ = __repr__
