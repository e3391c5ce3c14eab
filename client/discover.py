"""Find the model files under a directory: ONNX files by suffix, TorchScript files by suffix
*and* content, in a sorted, deterministic order.

`.pt`/`.pth` is also the suffix of plain `torch.save` checkpoints (a state dict is not a
model). Both are zip archives with a `data.pkl`, so that entry proves nothing; a TorchScript
archive also carries its compiled source under `<archive>/code/` and a `constants.pkl`, which a
checkpoint never has. Reading the zip directory costs one seek, not a load."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gradprobe.diagnostics.archives import is_pt2_archive
from gradprobe.diagnostics.errors import ModelLoadError

ONNX_SUFFIXES = (".onnx",)
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".ptl")
EXPORT_SUFFIXES = (".pt2",)  # torch.export.save archives
# Folders that never hold the user's models but can be huge: don't walk them.
SKIPPED_DIRS = {"__pycache__", "node_modules", "site-packages"}


def is_torchscript_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any("/code/" in name or name.endswith("constants.pkl") for name in names)


def is_model_file(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return True
    if suffix in EXPORT_SUFFIXES:
        return is_pt2_archive(path)
    return suffix in TORCHSCRIPT_SUFFIXES and is_torchscript_archive(path)


# Files a folder of models often holds beside them that are not lintable models: reported as
# skipped (with what they are) instead of passed over in silence.
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pkl", ".data", ".onnx_data")


@dataclass(frozen=True)
class Skipped:
    """A file under a linted folder that looks like a model but is not one gradprobe lints."""

    path: Path
    kind: str  # a few words: "weights-only checkpoint", "safetensors weights", ...
    reason: str  # the sentence a loader would have said ("is a ...: do this")


def _skipped(path: Path) -> Skipped | None:
    suffix = path.suffix.lower()
    if suffix not in TORCHSCRIPT_SUFFIXES + WEIGHT_SUFFIXES:
        return None
    from gradprobe.diagnostics.loaders.recognise import recognise

    try:
        with path.open("rb") as f:
            head = f.read(64)
    except OSError as exc:
        return Skipped(path, "unreadable", f"cannot be read ({exc.strerror})")
    found = recognise(path, head, path.name)
    if found is not None:
        return Skipped(path, *found)
    if suffix in TORCHSCRIPT_SUFFIXES:
        return Skipped(path, "not TorchScript", "is not a TorchScript archive")
    return None


def _beside_its_model(path: Path) -> bool:
    """`model.onnx.data` next to `model.onnx`: part of a model that is linted, not skipped."""
    name = path.name
    for suffix in (".data", "_data", ".bin"):
        if name.endswith(suffix) and (path.parent / name[: -len(suffix)]).suffix == ".onnx":
            return (path.parent / name[: -len(suffix)]).is_file()
    return False


def find_models(root: Path, skipped: list[Skipped] | None = None) -> list[Path]:
    """Every model file below `root`, sorted by relative path. Hidden folders (`.git`,
    `.venv`) and symlinked folders (loops) are not entered. Files that look like models but
    are not (weights-only checkpoints, safetensors, external data, git-lfs pointers) are
    appended to `skipped`, when given."""
    found, passed_over = [], []
    for directory, subdirs, files in os.walk(root, followlinks=False):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d not in SKIPPED_DIRS]
        for name in files:
            path = Path(directory) / name
            if name.startswith("."):
                continue
            if is_model_file(path):
                found.append(path)
            elif skipped is not None and not _beside_its_model(path):
                why = _skipped(path)
                if why is not None:
                    passed_over.append(why)

    def order(p: Path) -> str:
        return p.relative_to(root).as_posix()

    if skipped is not None:
        skipped.extend(sorted(passed_over, key=lambda s: order(s.path)))
    return sorted(found, key=order)


def expand_paths(paths: Iterable[Path], skipped: list[Skipped] | None = None) -> list[Path]:
    """Command-line paths to model files: a file stays as given (its loader decides, and says
    why if it cannot), a directory becomes the models below it (what it passes over goes to
    `skipped`). Order follows the arguments; a file reached twice is linted once."""
    result: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        if path.is_dir():
            models = find_models(path, skipped)
            if not models:
                raise ModelLoadError(f"{path}: no ONNX or TorchScript model files found "
                                     f"under this directory")
        else:
            models = [path]
        for model in models:
            key = model.resolve()
            if key not in seen:
                seen.add(key)
                result.append(model)
    return result
