"""What every ``vaepipe`` sub-command shares: the console, the refusal, the config loader."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

console = Console()


def fail(msg: str) -> None:
    """Print ``msg`` (secrets redacted) as an error and exit 2."""
    from pipeline.redact import redact_text

    console.print(f"[bold red]error:[/] {redact_text(msg)}", soft_wrap=True)
    raise typer.Exit(2)


def load(config: Optional[Path], overrides: List[str]):
    """The typed config from ``config`` and dotted overrides, or a clean refusal naming the bad key."""
    from pipeline.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        fail(str(exc))
