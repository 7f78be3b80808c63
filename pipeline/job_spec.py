"""What a cluster job is made of: the resolved config, the working dir Ray uploads, the env, the entrypoint.

Nothing here talks to Ray (``pipeline.jobs`` does) and nothing imports the training loop: a
job file is validated with ``load_config`` and a sweep file with ``load_sweep``, so a bad key
fails on the laptop, naming the key, before anything reaches the cluster.

The resolved config travels inside the uploaded working dir as ``.vaepipe_submit/<id>.yaml``.
The project itself is neither modified nor copied: a temporary folder holds one symlink per
top-level entry of the project (the excluded ones left out) plus that ``.vaepipe_submit/``
folder, and becomes the ``working_dir``. Ray follows the links when it zips the folder and
applies ``excludes`` and the project's ``.gitignore`` to what lies below them, exactly as it
would for the project. Concurrent submits cannot see each other's files, and a crash leaves
nothing behind in the checkout.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

import yaml

from pipeline.config import ConfigError, VaepipeConfig, load_config, to_yaml
from pipeline.credentials import split_userinfo
from pipeline.redact import redact_text

SUBMIT_DIR = ".vaepipe_submit"
"""Folder of the uploaded working dir that holds the submitted configs."""

EXCLUDES = ["/data/", "/runs/", "/.venv/", "/mlruns*", "/mlartifacts/", "/.git/"]
"""Never uploaded (gitignore syntax, anchored at the project root so ``pipeline/data/`` stays):
data sets, run folders, local tracking, the venv, git history."""

FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
"""Non-secret settings copied into the job's env when set here. Secrets never are: Ray Jobs
``env_vars`` are visible in the job's metadata and the dashboard."""


@dataclass
class JobSpec:
    submission_id: str
    kind: Literal["train", "tune"]
    entrypoint: str
    files: dict[str, str]
    """Path inside the working dir -> text (the resolved config, and a sweep's base)."""
    env_vars: dict[str, str]
    experiment: str
    tracking_uri: Optional[str]
    notes: list[str] = field(default_factory=list)
    """What the user should know: credentials not sent, paths that only exist on the cluster."""

    def metadata(self, config_path: Path) -> dict[str, str]:
        return {"vaepipe.kind": self.kind, "vaepipe.config": str(config_path), "vaepipe.experiment": self.experiment}


# A job runs ``vaepipe`` from the PATH of the process that started the Ray head. A head started
# from an environment that was never activated has none, and the job would end in
# "/bin/sh: 1: vaepipe: not found"; the guard says what is wrong and how to mend it instead.
_GUARD = ("command -v vaepipe >/dev/null 2>&1 || {{ echo 'vaepipe is not on the PATH of the Ray head running "
          "this job: start the head (ray start --head) from the environment vaepipe is installed in "
          "(for example after source .venv/bin/activate), or install vaepipe in the image the head runs' >&2; "
          "exit 127; }}; {command}")


def guarded(command: str) -> str:
    """The shell line Ray runs for ``command``: the vaepipe check above, then the command."""
    return _GUARD.format(command=command)


def command_of(shell_line: str) -> str:
    """The vaepipe command of a submitted shell line (the line itself for jobs vaepipe did not guard)."""
    prefix = _GUARD.format(command="")
    return shell_line[len(prefix):] if shell_line.startswith(prefix) else shell_line


def is_sweep_file(path: Path) -> bool:
    """A sweep file is a YAML mapping with a ``space:`` section."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file '{path}' cannot be read: {exc}") from None
    return isinstance(doc, dict) and "space" in doc


def make_submission_id(config_path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(config_path).stem).strip("-") or "job"
    return f"vaepipe-{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def build_job_spec(config_path: Path, overrides: Sequence[str] = (), submission_id: Optional[str] = None) -> JobSpec:
    """Validate the job or sweep file locally and resolve it into what the cluster runs."""
    from pipeline.tune import load_sweep

    config_path = Path(config_path)
    if not config_path.is_file():
        raise ConfigError(f"config file '{config_path}' does not exist")
    sid = submission_id or make_submission_id(config_path)
    if is_sweep_file(config_path):
        cfg, space = load_sweep(config_path, overrides)
        kind: Literal["train", "tune"] = "tune"
    else:
        cfg, space, kind = load_config(config_path, overrides), None, "train"
    cfg, env, notes = make_portable(cfg)
    files = config_files(sid, cfg, space)
    entrypoint = f"vaepipe {kind} --config {SUBMIT_DIR}/{sid}.yaml"
    return JobSpec(sid, kind, entrypoint, files, env, cfg.tracking.experiment, env.get("MLFLOW_TRACKING_URI"),
                   notes + path_notes(cfg))


def config_files(sid: str, cfg: VaepipeConfig, space: Optional[dict]) -> dict[str, str]:
    """A job: the resolved config. A sweep: the resolved base config and a sweep file naming it."""
    if space is None:
        return {f"{SUBMIT_DIR}/{sid}.yaml": to_yaml(cfg)}
    sweep = yaml.safe_dump({"base": f"{sid}.base.yaml", "space": space}, sort_keys=False)
    return {f"{SUBMIT_DIR}/{sid}.base.yaml": to_yaml(cfg), f"{SUBMIT_DIR}/{sid}.yaml": sweep}


def make_portable(cfg: VaepipeConfig) -> tuple[VaepipeConfig, dict[str, str], list[str]]:
    """The config as the cluster runs it, the job's env vars, and notes for the user.

    The job's driver connects to the cluster it runs on (Ray's job supervisor sets RAY_ADDRESS),
    so ``dist.address`` is dropped. The tracking URI travels without credentials.
    """
    uri, notes = tracking_uri_for_cluster(cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    cfg = replace(cfg, dist=replace(cfg.dist, address=None),
                  tracking=replace(cfg.tracking, tracking_uri=uri if cfg.tracking.tracking_uri else None))
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return cfg, env, notes


def tracking_uri_for_cluster(uri: Optional[str]) -> tuple[Optional[str], list[str]]:
    """An http(s) URI loses its ``user:password@`` (the cluster supplies its own credentials);
    a database URI with a password is refused: it cannot travel without showing the password."""
    if not uri:
        return None, ["no tracking URI (tracking.tracking_uri / MLFLOW_TRACKING_URI): the job tracks into "
                      "sqlite:///mlruns.db in its working dir on the cluster, which Ray deletes; point it at an MLflow server"]
    clean, user, password = split_userinfo(uri)
    if not uri.startswith(("http://", "https://")):
        if password:
            raise ConfigError(f"tracking URI {redact_text(uri)!r} holds a password, which a cluster job would show in its "
                              "metadata: run an MLflow server (infra/mlflow) and submit with its http(s) URI")
        return uri, ([f"tracking URI {uri!r} is a local store: it is read on the cluster's node, not here"]
                     if uri.startswith(("sqlite:", "file:")) or "://" not in uri else [])
    notes = []
    if user:
        notes.append("the credentials in the tracking URI were not sent (Ray job env vars are visible in the dashboard): "
                     "the cluster must set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD itself (infra/README.md)")
    return clean, notes


def path_notes(cfg: VaepipeConfig) -> list[str]:
    """Local paths name the cluster's file system; data/ and runs/ are never uploaded."""
    notes = []
    for key, value in (("data.path", cfg.data.path), ("train.storage_path", cfg.train.storage_path)):
        if "://" not in value and not Path(value).is_absolute():
            notes.append(f"{key}={value!r} is relative: on the cluster it is read inside the job's working dir, where "
                         f"data/ and runs/ are not uploaded; use s3:// or a path on the cluster's shared storage")
    return notes


def upload_excludes(root: Path) -> list[str]:
    """``EXCLUDES`` plus the project's own .gitignore patterns (negations left out)."""
    gitignore = root / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.is_file() else []
    extra = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith(("#", "!"))]
    return list(dict.fromkeys(EXCLUDES + extra))


def _excluded_at_top(name: str, excludes: list[str]) -> bool:
    return any(fnmatch(name, p.strip("/")) for p in excludes if "/" not in p.strip("/"))


@contextmanager
def staged_working_dir(root: Path, files: dict[str, str], excludes: list[str]) -> Iterator[Path]:
    """A temporary working dir: links to the project's top-level entries plus ``files``."""
    root = Path(root).resolve()
    with tempfile.TemporaryDirectory(prefix="vaepipe-submit-") as tmp:
        stage = Path(tmp) / root.name
        stage.mkdir()
        for entry in root.iterdir():
            if entry.name != SUBMIT_DIR and not _excluded_at_top(entry.name, excludes):
                os.symlink(entry, stage / entry.name)
        for rel, text in files.items():
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).write_text(text)
        yield stage


def project_root(start: Optional[Path] = None) -> Path:
    """The checkout to upload: the folder holding this package's pyproject.toml, else the cwd's."""
    for candidate in ([Path(start)] if start else []) + [Path(__file__).resolve().parent.parent, Path.cwd()]:
        if (candidate / "pyproject.toml").is_file() and (candidate / "pipeline").is_dir():
            return candidate.resolve()
    raise ConfigError("no vaepipe checkout to upload (a folder with pyproject.toml and pipeline/): run from the "
                      "project root or pass --working-dir")
