"""What rank 0 logs into the driver's MLflow run, surviving a tracking server that goes away.

Training must not stop because MLflow is unreachable (a restart, a network blip). Every call
goes through one queue: it is tried at once; if it fails, it and everything after it wait in
order in memory, and the queue is retried at most every ``retry_every_s`` seconds from the
next logging call on. A call leaves the queue only when the server accepted it, so nothing is
logged twice, and order is kept. Images are rendered before queueing, so a deferred image is
the picture of its own step; they go through ``MlflowClient.log_image(key=, step=)``. ``flush`` at the end of training waits up to
``flush_timeout_s`` for the server before it gives up with a warning (never an exception).

A resumed rank redoes the steps between its checkpoint and the kill. ``skip_held`` reads, in the
queue, what the run already holds (each metric's latest step, each image's key and step), and
the calls after it leave those out, so the run keeps one value per metric and step.
"""

from __future__ import annotations

import io
import os
import time
import warnings
from typing import Any, Callable

import numpy as np

from pipeline.redact import redact_text


class RankZeroLogger:
    """Rank 0 logs; every other rank gets ``enabled=False`` and every call is a no-op."""

    def __init__(self, uri: str, run_id: str, enabled: bool, retry_every_s: float = 5.0,
                 flush_timeout_s: float = 300.0, max_pending: int = 100_000):
        from pipeline.tracking import make_client

        # The queue below retries; MLflow's own HTTP retries (7, exponential, minutes in all)
        # would hold a training step for that long on every call while the server is away.
        for var, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                           ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
            os.environ.setdefault(var, value)
        self.enabled, self.run_id, self.uri = enabled, run_id, uri
        self.client = make_client(uri) if enabled else None
        self.retry_every_s, self.flush_timeout_s, self.max_pending = retry_every_s, flush_timeout_s, max_pending
        self.pending: list[tuple[str, Callable[[], None]]] = []
        self.failures = 0  # calls that failed at least once (each is retried until it succeeds)
        self._next_retry = 0.0
        self.held_metrics: dict[str, int] = {}  # key -> the latest step the run holds (skip_held)
        self.held_images: set[tuple[str, int]] = set()

    # -- what the training loop logs ----------------------------------------------------
    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None and np.isfinite(v)]
        for i in range(0, len(batch), 1000):  # MLflow caps a batch at 1000 metrics
            part = batch[i : i + 1000]
            self._submit(f"metrics@{step}", lambda part=part: self._log_new_metrics(part))

    def image(self, array: np.ndarray, key: str, step: int) -> None:
        """An image under ``key`` at ``step`` (MLflow's step slider and image comparison)."""
        if not self.enabled:
            return
        from PIL import Image

        self._image(Image.fromarray(array), key, step)

    def figure(self, fig, key: str, step: int) -> None:
        if not self.enabled:
            return
        import matplotlib.pyplot as plt
        from PIL import Image

        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        plt.close(fig)
        buf.seek(0)
        img = Image.open(buf)
        img.load()
        self._image(img.convert("RGB"), key, step)

    def dataset(self, dataset_input) -> None:
        """An ``mlflow.entities.DatasetInput`` (see ``pipeline.lineage``) as the run's input."""
        self._submit(f"input {dataset_input.dataset.name}",
                     lambda: self.client.log_inputs(self.run_id, datasets=[dataset_input]))

    def tags(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self._submit(f"tag {k}", lambda k=k, v=v: self.client.set_tag(self.run_id, k, redact_text(str(v))))

    def skip_held(self) -> None:
        """Leave out of every later call what the run already holds: a resumed rank redoes the steps
        after its checkpoint, and on the same world size their values are the ones already logged
        (deterministic resume). Read in the queue, so an outage defers it and every later call sees it."""
        self._submit("what the run holds", self._read_held)

    def call(self, what: str, fn: Callable[[], None]) -> None:
        """Any other logging call (``fn`` uses ``self.client``), queued in order like the rest. A
        retried ``fn`` must not redo what a failed try already did (``train.export`` keeps state)."""
        self._submit(what, fn)

    def flush(self) -> None:
        """Deliver everything still queued; give up with a warning after ``flush_timeout_s``."""
        if not self.enabled:
            return
        deadline = time.monotonic() + self.flush_timeout_s
        while self.pending and time.monotonic() < deadline:
            self._drain()
            if self.pending:
                time.sleep(min(self.retry_every_s, max(deadline - time.monotonic(), 0)))
        if self.pending:
            warnings.warn(f"MLflow at {self._where()} still unreachable: {len(self.pending)} logging calls "
                          f"(first: {self.pending[0][0]}) were not delivered", RuntimeWarning, stacklevel=2)

    # -- the queue ------------------------------------------------------------------------
    def _read_held(self) -> None:
        run = self.client.get_run(self.run_id)
        # MLflow keeps each metric's value at its highest step as the latest; ordered delivery
        # means every step before it was delivered too
        self.held_metrics = {m.key: m.step for m in run.data.to_proto().metrics}
        self.held_images = set(logged_images(self.client, self.run_id))

    def _log_new_metrics(self, part: list) -> None:
        part = [m for m in part if m.step > self.held_metrics.get(m.key, -1)]
        if part:
            self.client.log_batch(self.run_id, metrics=part)

    def _log_new_image(self, img, key: str, step: int, ts: int) -> None:
        if (key, step) not in self.held_images:
            self.client.log_image(self.run_id, img, key=key, step=step, timestamp=ts, synchronous=True)

    def _image(self, img, key: str, step: int) -> None:
        # The time is taken now: a call delivered after an outage keeps the time of its step.
        # MLflow writes an image as two files and a tag; a retry after a failure between them
        # can leave one extra file of the same key and step (the UI shows one per step).
        ts = int(time.time() * 1000)
        self._submit(f"image {key}@{step}", lambda: self._log_new_image(img, key, step, ts))

    def _submit(self, what: str, call: Callable[[], None]) -> None:
        if not self.enabled:
            return
        if len(self.pending) >= self.max_pending:
            self.pending.pop(0)  # bounded memory in a very long outage: the oldest call is dropped
        self.pending.append((what, call))
        if len(self.pending) == 1 or time.monotonic() >= self._next_retry:
            self._drain()

    def _drain(self) -> None:
        """Send queued calls in order until one fails; that one and the rest wait for the next retry."""
        while self.pending:
            what, call = self.pending[0]
            try:
                call()
            except Exception as exc:  # any transport or server error: keep the call, keep training
                self.failures += 1
                if self.failures == 1 or self.failures % 50 == 0:
                    print(f"[vaepipe] MLflow at {self._where()} unreachable ({type(exc).__name__}); "
                          f"{len(self.pending)} logging calls queued, retried every {self.retry_every_s:g} s",
                          flush=True)
                self._next_retry = time.monotonic() + self.retry_every_s
                return
            self.pending.pop(0)

    def _where(self) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(self.uri)
        return f"{parts.scheme}://{parts.hostname}:{parts.port}" if parts.hostname else parts.scheme or "?"


def logged_images(client, run_id: str) -> dict[tuple[str, int], list[str]]:
    """``{(key, step): [artifact paths]}`` of a run's images logged with ``log_image(key=, step=)``:
    MLflow names them ``images/<key, / as ~>+step+<step>+timestamp+<ms>+<uuid>.png``, which is
    what its UI reads for the step slider. More than one path for a key and step is a duplicate."""
    found: dict[tuple[str, int], list[str]] = {}
    for art in client.list_artifacts(run_id, "images"):
        name = art.path.rsplit("/", 1)[-1]
        if not name.endswith(".png"):
            continue  # the +compressed.webp thumbnails
        key, _, step, *_ = name[: -len(".png")].split("+")
        found.setdefault((key.replace("~", "/"), int(step)), []).append(art.path)
    return found
