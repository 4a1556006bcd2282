"""Defaults shared by every entry point, and the one path warnings take.

The home directory holds converted models (`<home>/models/`) and, unless a
cache directory is given, the agents' files. Warnings go to stderr through
`warn`, one line each, so the CLI, the API and the background threads report
the same way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_KV = "q4c"  # kvcache.KV_MODES; docs/quality.md
DEFAULT_MODEL = "smollm2-135m"
HOME_ENV = "AGENTCACHE_HOME"


def default_home() -> Path:
    """$AGENTCACHE_HOME, else ~/.agentcache."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".agentcache").expanduser()


def warn(msg: str) -> None:
    """Report one line to the user, on stderr."""
    print(msg, file=sys.stderr, flush=True)
