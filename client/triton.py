"""Triton / KServe model repositories: `<model>/config.pbtxt` beside numbered version folders
that hold `model.onnx` or `model.pt`.

Each model version becomes one file to lint with its inputs taken from `config.pbtxt`, parsed
with the protobuf text format of Triton's own model-config schema (`tritonclient`): input dims
and data types in the order the model takes them, a batch dimension in front when
`max_batch_size` > 0 (the probe batch is then at most `max_batch_size`), and no batch
dimension when it is 0. So TorchScript files need no `--input-shape`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gradprobe.diagnostics.errors import InputSpecError, ModelLoadError
from gradprobe.diagnostics.options import DiagnoseOptions

CONFIG = "config.pbtxt"
# platform/backend -> the file Triton loads when config.pbtxt names none
_DEFAULT_FILES = {"onnxruntime_onnx": "model.onnx", "onnxruntime": "model.onnx",
                  "pytorch_libtorch": "model.pt", "pytorch": "model.pt"}
_DTYPES = {"TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_BF16": "bfloat16",
           "TYPE_FP64": "float64", "TYPE_INT64": "int64", "TYPE_INT32": "int32",
           "TYPE_BOOL": "bool"}
# A dimension config.pbtxt leaves variable (-1) beyond the batch: sequence length, image side.
VARIABLE_DIM = 16
# Triton's TorchScript inputs are named `<name>__<position>`.
_POSITIONAL = re.compile(r"__(\d+)$")


@dataclass(frozen=True)
class TritonVersion:
    model: str
    version: str
    path: Path
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    max_batch_size: int

    def options(self, base: DiagnoseOptions) -> DiagnoseOptions:
        return base.model_copy(update={"input_shapes": [list(s) for s in self.shapes],
                                       "input_dtypes": list(self.dtypes)})

    @property
    def note(self) -> str:
        batching = (f"max_batch_size {self.max_batch_size}" if self.max_batch_size
                    else "no batching")
        inputs = ", ".join(f"{n} {'x'.join(map(str, s))} {d}"
                           for n, s, d in zip(self.names, self.shapes, self.dtypes, strict=True))
        return (f"Triton model '{self.model}' version {self.version}: inputs from config.pbtxt "
                f"({inputs}; {batching})")


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def is_repository(path: Path) -> bool:
    return path.is_dir() and any(is_model_folder(child) for child in path.iterdir())


def scan(paths: list[Path], batch_size: int) -> dict[Path, TritonVersion]:
    """Model file -> its Triton version, for every argument that is a model repository or a
    model folder of one. Other arguments add nothing."""
    found: dict[Path, TritonVersion] = {}
    for path in paths:
        folders = [path] if is_model_folder(path) else (
            sorted(c for c in path.iterdir() if is_model_folder(c)) if is_repository(path) else [])
        for folder in folders:
            for version in model_versions(folder, batch_size):
                found[version.path] = version
    return found


def model_versions(folder: Path, batch_size: int) -> list[TritonVersion]:
    config = read_config(folder / CONFIG)
    name = config.name or folder.name
    filename = config.default_model_filename or _DEFAULT_FILES.get(
        config.platform or config.backend, "")
    candidates = [filename] if filename else ["model.onnx", "model.pt"]
    names, shapes, dtypes = _inputs(config, name, batch_size)
    versions = []
    for version in sorted((d for d in folder.iterdir() if d.is_dir() and d.name.isdigit()),
                          key=lambda d: int(d.name)):
        file = next((version / c for c in candidates if (version / c).is_file()), None)
        if file is None:
            continue  # a version folder Triton would not load either
        ordered = _in_model_order(file, names)
        versions.append(TritonVersion(name, version.name, file,
                                      tuple(names[i] for i in ordered),
                                      tuple(shapes[i] for i in ordered),
                                      tuple(dtypes[i] for i in ordered), config.max_batch_size))
    if not versions:
        raise ModelLoadError(f"{folder}: Triton model '{name}' has no numbered version folder "
                             f"with {' or '.join(candidates)}")
    return versions


def read_config(path: Path):
    from google.protobuf import text_format
    from google.protobuf.message import DecodeError

    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise ModelLoadError(f"{path}: reading Triton model repositories needs tritonclient: "
                             "pip install 'gradprobe[triton]'") from None
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except (text_format.ParseError, DecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a Triton model configuration: {exc}") from None


def _inputs(config, model: str,
            batch_size: int) -> tuple[list[str], list[tuple[int, ...]], list[str]]:
    from tritonclient.grpc import model_config_pb2

    names, shapes, dtypes = [], [], []
    batch = min(batch_size, config.max_batch_size) if config.max_batch_size > 0 else None
    for spec in config.input:
        type_name = model_config_pb2.DataType.Name(spec.data_type)
        if type_name not in _DTYPES:
            raise InputSpecError(f"Triton model '{model}': input {spec.name} has data type "
                                 f"{type_name}, which gradprobe cannot feed")
        dims = [VARIABLE_DIM if d < 0 else int(d) for d in spec.dims]
        names.append(spec.name)
        shapes.append(tuple([batch, *dims] if batch is not None else dims))
        dtypes.append(_DTYPES[type_name])
    if not names:
        raise InputSpecError(f"Triton model '{model}': config.pbtxt declares no inputs")
    return names, shapes, dtypes


def _in_model_order(file: Path, names: list[str]) -> list[int]:
    """Positions of the config's inputs in the order the model takes them: ONNX by the graph's
    input names, TorchScript by Triton's `<name>__<position>` convention, else as listed."""
    order = list(range(len(names)))
    if file.suffix == ".onnx":
        import onnx

        graph = onnx.load(str(file), load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        position = {i.name: k for k, i in enumerate(x for x in graph.input
                                                    if x.name not in initializers)}
        if set(names) <= set(position):
            order.sort(key=lambda i: position[names[i]])
        return order
    numbers = [_POSITIONAL.search(n) for n in names]
    if all(numbers):
        order.sort(key=lambda i: int(numbers[i].group(1)))  # type: ignore[union-attr]
    return order
