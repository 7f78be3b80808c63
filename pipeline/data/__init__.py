"""The data layer: CelebA and synthetic CelebA sources -> WebDataset shards -> per-rank streams.

Modules are imported explicitly (``pipeline.data.shards``...) so that writing shards never
pulls in torch, and streaming never pulls in Ray.
"""


class progress_bar:
    """Context manager yielding ``advance(k)``: a rich bar when enabled, a no-op otherwise."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label = enabled, total, label
        self._progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda k: None
        from rich.progress import Progress

        self._progress = Progress()
        self._progress.start()
        task = self._progress.add_task(self.label, total=self.total)
        return lambda k: self._progress.advance(task, k)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False
