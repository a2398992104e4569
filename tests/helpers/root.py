"""Skip a test that cannot run here, with the exact reason: not root, or a tool missing."""

from __future__ import annotations

import os
import shutil

import pytest


def require_root(why: str) -> None:
    """Skip unless root; the reason says what needs it (``needs root: <why>``)."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


def require_tools(*tools: str, hint: str) -> None:
    """Skip naming the first of ``tools`` not on PATH (``needs <tool> (<hint>)``)."""
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} ({hint})")
