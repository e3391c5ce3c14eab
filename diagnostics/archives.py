"""Recognising a torch.export archive from its zip directory (no torch import: the client's
file discovery uses it too)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path


def is_pt2_archive(source: Path | bytes) -> bool:
    """A torch.export.save archive: a zip with an `archive_format` record (TorchScript
    archives have `code/` and `constants.pkl` instead). Reads the directory, not the data."""
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as zf:
            return any(n == "archive_format" or n.endswith("/archive_format")
                       for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
