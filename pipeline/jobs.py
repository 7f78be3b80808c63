"""Ray Jobs client: submit a ``job_spec.JobSpec`` to a cluster, follow it, list and stop jobs.

It never imports the training loop: the cluster runs the ``vaepipe`` CLI on the config it is sent.

The Ray auth token comes only from Ray's own sources (``RAY_AUTH_TOKEN``, the file named by
``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``): ``JobSubmissionClient`` reads it and sends it as
an ``Authorization`` header. vaepipe takes no token argument, so it is never on a command line,
and it is never put in the job's env vars, metadata or entrypoint. Ray's client only sends the
header when ``RAY_AUTH_MODE=token`` was set before ``ray`` was imported; ``enable_token_auth``
sets it when a token is there to send.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from pipeline.job_spec import JobSpec, command_of, guarded, staged_working_dir, upload_excludes
from pipeline.redact import redact_text

TOKEN_HELP = ("set RAY_AUTH_TOKEN to the cluster's token, or RAY_AUTH_TOKEN_PATH to a file holding it, "
              "or write it to ~/.ray/auth_token")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobsError(RuntimeError):
    """The cluster could not be reached or refused the request; the message says what to do."""


def resolve_address(address: Optional[str]) -> str:
    """``--address``, else an http(s) RAY_ADDRESS, else RAY_API_SERVER_ADDRESS: the dashboard URL."""
    env_addr = os.environ.get("RAY_ADDRESS", "")
    for value in (address, env_addr if env_addr.startswith(("http://", "https://")) else None,
                  os.environ.get("RAY_API_SERVER_ADDRESS")):
        if value:
            return value.rstrip("/")
    hint = f" (RAY_ADDRESS={env_addr!r} is not the dashboard's http address)" if env_addr else ""
    raise JobsError(f"no Ray dashboard address{hint}: pass --address http://<head>:8265 or set RAY_ADDRESS to it "
                    "(through `kubectl port-forward` or an SSH tunnel, see infra/README.md)")


def token_available() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or bool(path and Path(path).is_file()) \
        or (Path.home() / ".ray" / "auth_token").is_file()


def enable_token_auth() -> None:
    """Make Ray's client send the token when one is there (must run before ``import ray``)."""
    if "RAY_AUTH_MODE" not in os.environ and token_available():
        os.environ["RAY_AUTH_MODE"] = "token"


@contextmanager
def cluster_errors(address: str) -> Iterator[None]:
    """Ray's auth and connection failures as one ``JobsError`` that names what to set, never the token."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        status = "403, token rejected" if "failed" in str(exc).lower() else "401, no token sent"
        raise JobsError(f"the Ray cluster at {address} refused the request ({status}): {TOKEN_HELP}") from None
    except ConnectionError as exc:
        raise JobsError(f"cannot reach the Ray dashboard at {address} ({type(exc).__name__}): check --address / "
                        "RAY_ADDRESS and the port-forward or tunnel") from None
    except RuntimeError as exc:
        if "status code 401" in str(exc) or "status code 403" in str(exc):
            raise JobsError(f"the Ray cluster at {address} refused the request: {TOKEN_HELP}") from None
        raise


def connect(address: Optional[str]):
    """A ``JobSubmissionClient`` for the dashboard at ``address``; checks the connection and the token."""
    address = resolve_address(address)
    enable_token_auth()
    from ray.job_submission import JobSubmissionClient

    with cluster_errors(address):
        return JobSubmissionClient(address)


def dashboard_url(client, job_id: str) -> str:
    return f"{client.get_address()}/#/jobs/{job_id}"


def submit(client, spec: JobSpec, config_path: Path, root: Path) -> str:
    """Upload the project (with the resolved config) and start the job; returns the submission id."""
    excludes = upload_excludes(root)
    with staged_working_dir(root, spec.files, excludes) as stage, cluster_errors(client.get_address()):
        runtime_env = {"working_dir": str(stage), "excludes": excludes, "env_vars": spec.env_vars}
        return client.submit_job(entrypoint=guarded(spec.entrypoint), submission_id=spec.submission_id,
                                 runtime_env=runtime_env, metadata=spec.metadata(config_path))


def wait_until_done(client, job_id: str, timeout_s: float = 60.0, poll_s: float = 0.5) -> str:
    """The job's terminal status, polled (``None``-free); raises when it is not terminal in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        with cluster_errors(client.get_address()):
            status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise JobsError(f"job {job_id} is still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def follow_logs(client, job_id: str, write: Callable[[str], None] = sys.stdout.write) -> str:
    """Stream the job's logs until it ends; returns its terminal status.

    Ray's log tail can end before the last lines of a short job reach it, so once the job is
    over the stored log is read once more and what the stream did not carry is written too."""
    streamed = 0

    async def tail() -> None:
        nonlocal streamed
        async for chunk in client.tail_job_logs(job_id):
            streamed += len(chunk)
            write(redact_text(chunk))
            sys.stdout.flush()

    with cluster_errors(client.get_address()):
        asyncio.run(tail())
    status = wait_until_done(client, job_id)
    with cluster_errors(client.get_address()):
        rest = client.get_job_logs(job_id)[streamed:]
    if rest:
        write(redact_text(rest))
        sys.stdout.flush()
    return status


def stop(client, job_id: str, timeout_s: float = 60.0) -> str:
    """Ask Ray to stop the job and wait for it to end; returns its final status."""
    with cluster_errors(client.get_address()):
        client.stop_job(job_id)
    return wait_until_done(client, job_id, timeout_s)


def job_rows(client) -> list[dict]:
    """Every job of the cluster, oldest first, as plain rows for a table."""
    with cluster_errors(client.get_address()):
        jobs = client.list_jobs()
    rows = [{"id": j.submission_id or j.job_id, "status": str(j.status.value), "entrypoint": command_of(j.entrypoint),
             "experiment": (j.metadata or {}).get("vaepipe.experiment", "-"), "start": j.start_time or 0} for j in jobs]
    return sorted(rows, key=lambda r: r["start"])


def job_info(client, job_id: str):
    with cluster_errors(client.get_address()):
        return client.get_job_info(job_id)


def job_logs(client, job_id: str) -> str:
    with cluster_errors(client.get_address()):
        return redact_text(client.get_job_logs(job_id))
