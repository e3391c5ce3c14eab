"""Models from the real libraries (timm, torchvision, transformers) at their own default init.

Shared by the hub sweep (`bench/hub_sweep.py`), the planted-defect sweep
(`bench/planted_sweep.py`) and `tests/test_library_models.py`. Nothing is ever downloaded:
timm and torchvision build with `pretrained=False` / `weights=None`, transformers models come
from a config object shrunk to a tiny size (`tiny_config`).

Inputs are small on purpose (the sweep runs on 2 CPU cores): batch 2, 64 px images (96 or the
model's own size where it needs one), 16-token sequences, a fraction of a second of audio.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

LIBRARIES = ("timm", "torchvision", "transformers")
EXPORTS = ("torchscript", "onnx_legacy", "onnx_dynamo")
BATCH = 2
IMAGE_SIZES = (64, 96)
SEQ_LEN = 16
AUDIO_SAMPLES = 3200  # 0.2 s at 16 kHz: 9 frames after wav2vec2's feature encoder


class NotApplicable(Exception):
    """The architecture does not fit this harness (detection heads, paired images, ...)."""


@dataclass
class Built:
    """One model ready to export: the module (eval mode, returns one tensor) and its inputs."""

    library: str
    name: str
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    parameters: int


# ---------------------------------------------------------------------------------------------
# Listing and families


def list_names(library: str) -> list[str]:
    if library == "timm":
        import timm

        return sorted(timm.list_models())
    if library == "torchvision":
        import torchvision

        return sorted(torchvision.models.list_models())
    if library == "transformers":
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

        return sorted(MODEL_MAPPING_NAMES)
    raise ValueError(f"unknown library {library!r}")


def families(library: str) -> dict[str, str]:
    """name -> family (the module that defines it), so a sample covers architectures, not
    variants of one architecture."""
    names = list_names(library)
    if library == "timm":
        import timm

        family = {}
        for module in timm.list_modules():
            for name in timm.list_models(module=module):
                family[name] = module
        return {n: family.get(n, n) for n in names}
    if library == "torchvision":
        import torchvision

        return {n: torchvision.models.get_model_builder(n).__module__.split(".")[-1] + ":"
                + re.sub(r"[\d_].*$", "", n) for n in names}
    return {n: n for n in names}


# ---------------------------------------------------------------------------------------------
# Building


class FirstTensor(nn.Module):
    """Calls a model and returns what users export: the logits or feature map of a vision
    model, the tensors of a transformers model's output (`last_hidden_state`, `pooler_output`,
    ...; caches and None left out), so every parameter the model uses reaches an output."""

    def __init__(self, model: nn.Module, keyword: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.keyword = keyword

    def forward(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.model(**{self.keyword: args[0]}) if self.keyword else self.model(*args)
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, dict):
            tensors = tuple(v for v in out.values() if isinstance(v, torch.Tensor))
            return tensors[0] if len(tensors) == 1 else tensors
        return first_tensor(out)


def first_tensor(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        if "last_hidden_state" in out and out["last_hidden_state"] is not None:
            return out["last_hidden_state"]
        values = [v for v in out.values() if v is not None]
        return first_tensor(values[0])
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    if hasattr(out, "to_tuple"):
        return first_tensor(out.to_tuple())
    raise TypeError(f"model returned {type(out).__name__}, not a tensor")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameters_on_meta(library: str, name: str) -> int | None:
    """Parameter count without allocating anything; None when the model cannot build on meta."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return count_parameters(_construct(library, name))
    except Exception:
        return None


def _construct(library: str, name: str) -> nn.Module:
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    if library == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, **_no_backbone_download(name))
    from transformers import AutoModel

    return AutoModel.from_config(tiny_config(name))


def build(library: str, name: str, *, seed: int = 0) -> Built:
    """Build `name` at the library's default init, eval mode, with inputs it runs on."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if library == "timm":
            return _build_timm(name)
        if library == "torchvision":
            return _build_torchvision(name)
        if library == "transformers":
            return _build_transformers(name)
    raise ValueError(f"unknown library {library!r}")


def _runs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bool:
    try:
        with torch.no_grad():
            first_tensor(module(*inputs))
        return True
    except Exception:
        return False


def _image(size: int, channels: int = 3) -> tuple[torch.Tensor]:
    return (torch.randn(BATCH, channels, size, size),)


def _build_timm(name: str) -> Built:
    import timm

    model = timm.create_model(name, pretrained=False).eval()
    channels, native = model.pretrained_cfg.get("input_size", (3, 224, 224))[0], None
    size_cfg = model.pretrained_cfg.get("input_size", (3, 224, 224))
    native = size_cfg[-1]
    for size in IMAGE_SIZES:
        if _runs(model, _image(size, channels)):
            return Built("timm", name, FirstTensor(model).eval(), _image(size, channels),
                         count_parameters(model))
    # Fixed-size position embeddings or windows: ask for a small image size where allowed.
    for size in IMAGE_SIZES:
        try:
            small = timm.create_model(name, pretrained=False, img_size=size).eval()
        except Exception:
            break
        if _runs(small, _image(size, channels)):
            return Built("timm", name, FirstTensor(small).eval(), _image(size, channels),
                         count_parameters(small))
    if _runs(model, _image(native, channels)):
        return Built("timm", name, FirstTensor(model).eval(), _image(native, channels),
                     count_parameters(model))
    raise RuntimeError(f"runs on none of {IMAGE_SIZES} px nor its own {native} px")


TORCHVISION_NOT_APPLICABLE = {
    "detection": "detection models take a list of images and return boxes",
    "optical_flow": "optical-flow models take an image pair",
}


def _no_backbone_download(name: str) -> dict:
    """Segmentation and detection builders default to an ImageNet backbone, which they would
    download: ask for none."""
    import inspect

    import torchvision

    builder = torchvision.models.get_model_builder(name)
    return {"weights_backbone": None} if "weights_backbone" in inspect.signature(
        builder).parameters else {}


def _build_torchvision(name: str) -> Built:
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    area = builder.__module__.split(".")[2] if builder.__module__.count(".") >= 2 else ""
    if area in TORCHVISION_NOT_APPLICABLE:
        raise NotApplicable(TORCHVISION_NOT_APPLICABLE[area])
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
    kwargs.update(_no_backbone_download(name))
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    wrapped = FirstTensor(model).eval()
    if area == "video":
        sizes = [(torch.randn(BATCH, 3, 8, s, s),) for s in (64, 112)]
    else:
        sizes = [_image(s) for s in (*IMAGE_SIZES, 224)]
    for inputs in sizes:
        if _runs(wrapped, inputs):
            return Built("torchvision", name, wrapped, inputs, count_parameters(model))
    raise RuntimeError("runs on none of the probe sizes")


# Sizes a transformers config is shrunk to. Keys are config attributes; only those a config
# already has are set.
TINY = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "dim": 32, "embed_dim": 32,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "encoder_layers": 2,
    "decoder_layers": 2, "num_decoder_layers": 2,
    "num_attention_heads": 2, "n_head": 2, "n_heads": 2, "encoder_attention_heads": 2,
    "decoder_attention_heads": 2, "num_key_value_heads": 2,
    "intermediate_size": 64, "ffn_dim": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "n_inner": 64, "d_ff": 64, "hidden_dim": 64, "d_kv": 16, "head_dim": 16,
    "vocab_size": 256, "image_size": 64, "rotary_dim": 8, "max_source_positions": 16,
    "num_mel_bins": 16,
}


def tiny_config(model_type: str):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    _shrink(config)
    return config


def _token_ids(config: object) -> list[int]:
    ids = []
    for key, value in vars(config).items():
        if key.endswith("token_id") and isinstance(value, int) and not isinstance(value, bool):
            ids.append(value)
    return ids


def _shrink(config: object, depth: int = 0) -> None:
    from transformers import PretrainedConfig

    for key, value in TINY.items():
        if key == "vocab_size":  # special tokens must stay inside the table
            value = max([value, *(i + 1 for i in _token_ids(config))])
        current = getattr(config, key, None)
        if isinstance(current, int) and not isinstance(current, bool) and current > value:
            try:
                setattr(config, key, value)
            except Exception:
                pass
    if depth < 2:
        for attr in list(vars(config)):
            sub = getattr(config, attr, None)
            if isinstance(sub, PretrainedConfig):
                _shrink(sub, depth + 1)


def _build_transformers(model_type: str) -> Built:
    from transformers import AutoModel

    config = tiny_config(model_type)
    model = AutoModel.from_config(config).eval()
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model = model.get_encoder().eval()  # what users export of a seq2seq model: its encoder
    keyword = getattr(model, "main_input_name", "input_ids")
    if keyword == "input_ids":
        vocab = getattr(config, "vocab_size", None) or getattr(
            getattr(config, "text_config", None), "vocab_size", 100)
        inputs = (torch.randint(0, min(int(vocab), 100), (BATCH, SEQ_LEN)),)
    elif keyword == "pixel_values":
        channels = getattr(config, "num_channels", 3)
        size = getattr(config, "image_size", 64)
        size = size[0] if isinstance(size, (list, tuple)) else size
        inputs = _image(int(size), int(channels))
    elif keyword == "input_values":
        inputs = (torch.randn(BATCH, AUDIO_SAMPLES),)
    elif keyword == "input_features":
        bins = getattr(config, "num_mel_bins", 80)
        frames = 2 * getattr(config, "max_source_positions", 16)
        inputs = (torch.randn(BATCH, int(bins), int(frames)),)
    else:
        raise NotApplicable(f"main input {keyword!r} is not one the harness feeds")
    wrapped = FirstTensor(model, keyword).eval()
    if not _runs(wrapped, inputs):
        with torch.no_grad():
            first_tensor(wrapped(*inputs))  # raises the model's own error
    return Built("transformers", model_type, wrapped, inputs, count_parameters(model))


# ---------------------------------------------------------------------------------------------
# Exporting, as users do: eval mode


def export(built: Built, how: str, directory: Path) -> Path:
    module, args = built.module.eval(), built.inputs
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{built.library}-{built.name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "torchscript":
            path = directory / f"{stem}.pt"
            traced = torch.jit.trace(module, args, check_trace=False, strict=False)
            torch.jit.save(traced, str(path))
            return path
        path = directory / f"{stem}.{how}.onnx"
        if how == "onnx_legacy":
            names = [f"input{i}" for i in range(len(args))]
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=names,
                              output_names=["output"],
                              dynamic_axes={n: {0: "batch"} for n in names})
            return path
        if how == "onnx_dynamo":
            torch.onnx.export(module, args, str(path), dynamo=True, verbose=False)
            return path
    raise ValueError(f"unknown export {how!r}")


def lint_options(built: Built, how: str):
    from gradprobe.diagnostics.options import DiagnoseOptions

    if how == "torchscript":
        return DiagnoseOptions(device="cpu", input_shapes=[list(a.shape) for a in built.inputs],
                               input_dtypes=[str(a.dtype).removeprefix("torch.")
                                             for a in built.inputs])
    return DiagnoseOptions(device="cpu", batch_size=BATCH)

