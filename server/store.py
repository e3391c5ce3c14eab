"""Content-addressed model store: every model lives at `<root>/<sha256><ext>`.

Names a client sends are never used as paths: a file's name is the hash of its bytes, which the
store computes itself, and its extension comes from a fixed table. Uploads stream into a temp
file under `<root>/incoming/` and appear under their final name only once size and hash check.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from gradprobe.server.errors import ModelNotFound, ModelTooLarge, RequestError, UploadError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
EXTENSIONS = {None: ".model", "onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}


def check_sha256(value: str) -> str:
    """The canonical form of a client-supplied sha256, or RequestError."""
    sha = value.strip().lower()
    if not _SHA256.match(sha):
        raise RequestError(f"sha256 must be 64 hex digits, got {value[:80]!r}")
    return sha


@dataclass(frozen=True)
class UploadHeader:
    """The first message of an upload, checked."""

    sha256: str
    size_bytes: int
    format: str | None  # "onnx", "torchscript", None: unknown


class ModelStore:
    def __init__(self, root: Path, max_model_bytes: int) -> None:
        self.root = Path(root).resolve()
        self.max_model_bytes = max_model_bytes
        self.incoming = self.root / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        for stale in self.incoming.glob("*.part"):  # left by a server that was killed
            stale.unlink(missing_ok=True)

    def find(self, sha256: str) -> Path | None:
        sha = check_sha256(sha256)
        for ext in EXTENSIONS.values():
            path = self.root / f"{sha}{ext}"
            if path.is_file():
                return path
        return None

    def path_of(self, sha256: str) -> Path:
        path = self.find(sha256)
        if path is None:
            raise ModelNotFound(f"no model with sha256 {sha256} in the store: upload it first")
        return path

    def check_header(self, sha256: str, size_bytes: int, fmt: str | None) -> UploadHeader:
        """Validate an upload's metadata before a single chunk is read."""
        sha = check_sha256(sha256)
        if size_bytes <= 0:
            raise UploadError(f"size_bytes must be positive, got {size_bytes}")
        if size_bytes > self.max_model_bytes:
            raise ModelTooLarge(
                f"model of {size_bytes} bytes is over this server's limit of "
                f"{self.max_model_bytes} bytes (--max-model-mb)"
            )
        return UploadHeader(sha, size_bytes, fmt)

    async def receive(self, header: UploadHeader, chunks: AsyncIterator[bytes]) -> Path:
        """Stream `chunks` into the store, checking the byte count as it goes and the hash at the
        end. Whatever goes wrong (including cancellation), no partial file stays behind."""
        fd, tmp_name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=self.incoming)
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        received = 0
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    received += len(chunk)
                    if received > header.size_bytes:
                        raise UploadError(
                            f"upload sent more than the declared {header.size_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
            if received < header.size_bytes:
                raise UploadError(
                    f"upload stream ended after {received} of {header.size_bytes} bytes")
            actual = digest.hexdigest()
            if actual != header.sha256:
                raise UploadError(
                    f"sha256 of the uploaded bytes is {actual}, not the declared {header.sha256}")
            final = self.root / f"{header.sha256}{EXTENSIONS[header.format]}"
            os.replace(tmp, final)  # atomic: a concurrent upload of the same bytes is harmless
            return final
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
