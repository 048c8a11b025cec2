"""What every `fleet` command prints with: plain greppable lines, timestamped progress, one console."""

from __future__ import annotations

import datetime as dt
import sys

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)

_STYLES = {"info": "", "warn": "yellow", "error": "bold red"}


def say(text: str, stderr: bool = False) -> None:
    """A plain line (no wrapping or markup), so messages stay greppable in CI logs."""
    print(text, file=sys.stderr if stderr else sys.stdout, flush=True)


def progress(level: str, text: str) -> None:
    """A timestamped line of a long command's progress (level: info, warn, error)."""
    stamp = dt.datetime.now().strftime("%H:%M:%S")
    console.print(f"[dim]{stamp}[/dim] {text}", style=_STYLES.get(level, ""), markup=True)
