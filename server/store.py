"""Content-addressed model store: every model lives at `<root>/<sha256><ext>`.

Names a client sends are never used as paths: a file's name is the hash of its bytes, which the
store computes itself, and its extension comes from a fixed table. Uploads stream into a temp
file under `<root>/incoming/` and appear under their final name only once size and hash check.

With a quota (`--store-max-gb`) the store is a cache: stored models and uploads in progress
count against it, and the least recently used models (by the time they were last uploaded or
probed) are evicted to make room; models being probed are never evicted. When nothing can be
evicted the upload gets RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from gradprobe.server.errors import (
    ModelNotFound,
    ModelTooLarge,
    RequestError,
    StoreFull,
    UploadError,
    UploadsBusy,
)
from gradprobe.server.metrics import ServerMetrics

log = logging.getLogger("gradprobe.server")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
EXTENSIONS = {None: ".model", "onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}
# Empty chunks carry nothing; a stream of them would never end on its own.
MAX_EMPTY_CHUNKS = 64


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
    def __init__(self, root: Path, max_model_bytes: int, *, max_receiving: int = 64,
                 max_bytes: int | None = None, metrics: ServerMetrics | None = None) -> None:
        self.root = Path(root).resolve()
        self.metrics = metrics or ServerMetrics()
        self.max_model_bytes = max_model_bytes
        self.max_receiving = max_receiving  # uploads holding a temp file at once
        self.receiving = 0
        self.max_bytes = max_bytes  # quota over stored models + uploads in progress
        self.incoming = self.root / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        for stale in self.incoming.glob("*.part"):  # left by a server that was killed
            stale.unlink(missing_ok=True)
        self.stored_bytes = sum(p.stat().st_size for p in self._models())
        self.incoming_bytes = 0
        self._held: dict[str, int] = {}  # sha256 -> probes using it: never evicted

    def _models(self) -> list[Path]:
        return [p for p in self.root.iterdir()
                if p.is_file() and _SHA256.match(p.name.split(".", 1)[0])]

    @property
    def used_bytes(self) -> int:
        return self.stored_bytes + self.incoming_bytes

    def find(self, sha256: str) -> Path | None:
        sha = check_sha256(sha256)
        for ext in EXTENSIONS.values():
            path = self.root / f"{sha}{ext}"
            if path.is_file():
                with contextlib.suppress(OSError):
                    os.utime(path)  # recently used: last to be evicted
                return path
        return None

    @contextlib.contextmanager
    def hold(self, sha256: str):  # noqa: ANN201
        """Keep `sha256` from eviction while a probe uses it."""
        self._held[sha256] = self._held.get(sha256, 0) + 1
        try:
            yield
        finally:
            self._held[sha256] -= 1
            if not self._held[sha256]:
                del self._held[sha256]

    def _make_room(self, needed: int) -> None:
        """Evict least recently used models until `needed` more bytes fit the quota."""
        if self.max_bytes is None or self.used_bytes + needed <= self.max_bytes:
            return
        candidates = []
        for path in self._models():
            with contextlib.suppress(OSError):
                candidates.append((path.stat().st_mtime, path))
        for _, path in sorted(candidates):
            if self.used_bytes + needed <= self.max_bytes:
                return
            if path.name.split(".", 1)[0] in self._held:
                continue
            with contextlib.suppress(OSError):
                size = path.stat().st_size
                path.unlink()
                self.stored_bytes -= size
                self.metrics.store_evictions.inc()
                log.info("store: evicted %s (%d bytes); store now %d of %d bytes", path.name,
                         size, self.used_bytes, self.max_bytes)
        if self.used_bytes + needed > self.max_bytes:
            raise StoreFull(
                f"the model store is full ({self.used_bytes} of {self.max_bytes} bytes, "
                "--store-max-gb) and every model in it is in use; retry later")

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
        if self.max_bytes is not None and size_bytes > self.max_bytes:
            raise StoreFull(f"model of {size_bytes} bytes is over this server's store quota "
                            f"of {self.max_bytes} bytes (--store-max-gb)")
        return UploadHeader(sha, size_bytes, fmt)

    async def receive(self, header: UploadHeader, chunks: AsyncIterator[bytes]) -> Path:
        """Stream `chunks` into the store, checking the byte count as it goes and the hash at the
        end. Whatever goes wrong (including cancellation), no partial file stays behind. The
        temp file is made at the first byte: an upload that only sent metadata holds none."""
        tmp: Path | None = None
        out = None
        digest = hashlib.sha256()
        received = 0
        counted = 0  # this upload's share of incoming_bytes
        empty = 0
        try:
            async for chunk in chunks:
                if not chunk:
                    empty += 1
                    if empty > MAX_EMPTY_CHUNKS:
                        raise UploadError(f"upload sent more than {MAX_EMPTY_CHUNKS} empty "
                                          "chunks")
                    continue
                received += len(chunk)
                if received > header.size_bytes:
                    raise UploadError(
                        f"upload sent more than the declared {header.size_bytes} bytes")
                self._make_room(len(chunk))
                self.incoming_bytes += len(chunk)
                counted += len(chunk)
                if out is None:
                    if self.receiving >= self.max_receiving:
                        raise UploadsBusy(f"{self.max_receiving} uploads are receiving data "
                                          "(--max-uploads); retry later")
                    fd, tmp_name = tempfile.mkstemp(prefix="upload-", suffix=".part",
                                                    dir=self.incoming)
                    tmp, out = Path(tmp_name), os.fdopen(fd, "wb")
                    self.receiving += 1
                digest.update(chunk)
                out.write(chunk)
            if out is not None:
                out.close()
            if received < header.size_bytes:
                raise UploadError(
                    f"upload stream ended after {received} of {header.size_bytes} bytes")
            actual = digest.hexdigest()
            if actual != header.sha256:
                raise UploadError(
                    f"sha256 of the uploaded bytes is {actual}, not the declared {header.sha256}")
            final = self.root / f"{header.sha256}{EXTENSIONS[header.format]}"
            assert tmp is not None  # size_bytes > 0 and all of it arrived
            replaced = final.stat().st_size if final.is_file() else 0
            os.replace(tmp, final)  # atomic: a concurrent upload of the same bytes is harmless
            self.stored_bytes += received - replaced
            self.metrics.uploaded_bytes.inc(received)
            return final
        finally:
            self.incoming_bytes -= counted
            if out is not None:
                out.close()
                self.receiving -= 1
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
