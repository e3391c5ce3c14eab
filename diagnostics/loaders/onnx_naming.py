"""Recover the user's module paths (`layer1.0.conv1`) from what exporters leave in an ONNX file.

What the exporters write (observed with torch 2.13, see tests/test_onnx_loader.py):
- Legacy TorchScript exporter: node names are scope paths, `/layer1/layer1.0/conv1/Conv`. Each
  segment is the module's qualified name cut back to its last non-numeric atom, so children of
  a Sequential repeat the parent's name (`layer1` / `layer1.0`) while children of a ModuleList,
  whose own forward is never called, do not (`encoder` / `layers.0`). A module called twice
  gets `_1` on its second call's segment (`relu` / `relu_1`).
- Dynamo exporter: node names are `node_conv2d_3`; the module path sits in `metadata_props`:
  `pkg.torch.onnx.name_scopes` is a Python-literal list of cumulative qualified names plus the
  op's own name (`['', 'layer1', 'layer1.0', 'layer1.0.relu', 'relu_1']`), and
  `pkg.torch.onnx.class_hierarchy` the matching module classes. `namespace` carries both as
  `name: class/name: class/...`.
- Parameter initializers keep their state-dict names (`net.2.weight`) unless the exporter
  computed them (legacy BatchNorm folding: `onnx::Conv_123`; dynamo transposed weights:
  `val_12`).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Sequence

import onnx

_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_CLASS_HIERARCHY = "pkg.torch.onnx.class_hierarchy"
_NAMESPACE = "namespace"

# Initializer names that exporters invent (not the user's): `onnx::Conv_123`, `val_12`, `_val_3`,
# bare numbers from old exporters, and the dynamo exporter's constants named after the aten
# overload or op that made them (`scalar_tensor_default`: Swin's attention-mask fill value;
# `sub_3`: its shifted-window mask, `clone_2`: GPT-Neo's mask fill), never a state-dict name.
_OP_NAMED = (r"(?:sub|add|mul|div|neg|clone|masked_fill|where|expand|full|full_like|arange|cat"
             r"|lift_fresh_copy|_to_copy|zeros|ones|tril|triu|transpose|view|reshape|permute"
             r"|unsqueeze|squeeze|slice|select|repeat|contiguous)(?:_\d+)?")
_ANONYMOUS = re.compile(
    r"^(?:.*::.*|_?val_\d+|\d+|_?v_\d+|[A-Za-z]*[Cc]onstant\w*_\d+|[a-z_]+_default(?:_\d+)?"
    rf"|{_OP_NAMED})$")
_REUSE_SUFFIX = re.compile(r"^(.+)_(\d+)$")


def is_anonymous(name: str) -> bool:
    """True for names an exporter made up, false for state-dict names like `net.2.weight`."""
    return bool(_ANONYMOUS.match(name))


def owner_of(param_name: str) -> str | None:
    """The module that owns a state-dict parameter name: `net.2.weight` -> `net.2`.

    None for anonymous names and for attributes of the root module (`cls_token`), which say
    nothing about the layer.
    """
    if is_anonymous(param_name) or "." not in param_name:
        return None
    return param_name.rsplit(".", 1)[0]


def _metadata(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def _literal_list(text: str | None) -> list[str] | None:
    if not text:
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _join_scopes(parts: Sequence[str]) -> str:
    """Module parts of a dynamo scope list -> qualified path. Newer exporters write cumulative
    names (`layer1`, `layer1.0`); older ones wrote relative ones (`layer1`, `0`)."""
    parts = [p for p in parts if p]
    if not parts:
        return ""
    cumulative = all(b.startswith(a + ".") for a, b in zip(parts, parts[1:], strict=False))
    return parts[-1] if cumulative else ".".join(parts)


def _legacy_path(segments: Sequence[str]) -> str:
    """Legacy exporter scope segments -> qualified module path (see module docstring)."""
    atoms: list[str] = []
    for segment in segments:
        seg_atoms = segment.split(".")
        head, tail = seg_atoms[0], seg_atoms[1:]
        joined = False
        if tail and all(a.isdigit() for a in tail):
            # `layer1.0` under `layer1`: the segment restates its Sequential parent's atoms.
            for i in range(len(atoms) - 1, -1, -1):
                if atoms[i] == head and all(a.isdigit() for a in atoms[i + 1:]):
                    atoms = atoms[:i] + seg_atoms
                    joined = True
                    break
        if not joined:
            atoms.extend(seg_atoms)
    return ".".join(atoms)


def node_scope(node: onnx.NodeProto) -> str | None:
    """The module path that produced `node` ('' for the root module), or None if unknown.

    Reuse suffixes of the legacy exporter (`relu_1`) are still in the result; `ScopeNamer`
    folds them back.
    """
    found = _scope_and_origin(node)
    return found[0] if found else None


def _scope_and_origin(node: onnx.NodeProto) -> tuple[str, bool] | None:
    """(module path, whether it came from a legacy node name)."""
    meta = _metadata(node)
    scopes = _literal_list(meta.get(_NAME_SCOPES))
    if scopes is not None and len(scopes) >= 1:
        return _join_scopes(scopes[:-1]), False
    namespace = meta.get(_NAMESPACE)
    if namespace:
        names = [item.split(":", 1)[0].strip() for item in namespace.split("/")]
        return _join_scopes(names[:-1]), False
    name = node.name
    if name.startswith("/"):
        segments = [s for s in name.split("/")[1:-1] if s]
        return _legacy_path(segments), True
    return None


def module_class(node: onnx.NodeProto) -> str | None:
    """Class name of the module that produced `node` (`ReLU`, `BatchNorm2d`), dynamo only."""
    classes = _literal_list(_metadata(node).get(_CLASS_HIERARCHY))
    if classes and len(classes) >= 2:
        return classes[-2].rsplit(".", 1)[-1]
    return None


def class_hierarchy(node: onnx.NodeProto) -> list[str]:
    return _literal_list(_metadata(node).get(_CLASS_HIERARCHY)) or []


_FX_NODE = "pkg.torch.onnx.fx_node"
# torch.export names the graph's lifted inputs by kind: `p_` parameters, `b_` buffers, `c_`
# constant tensors (the dynamo exporter writes the FX node in each ONNX node's metadata).
_FX_ARGS = re.compile(r"\(args = \((.*?)\)(?:, kwargs|\)\s*$)")
_FX_LIFTED = re.compile(r"%([pbc])_\w+")


def reads_only_buffers(node: onnx.NodeProto) -> bool:
    """True when the FX call this node came from (dynamo export) takes buffers or constants
    and no parameter: a fixed matrix, such as csatv2's DCT (`F.linear(x, self.weights)` with a
    registered buffer), whose initializer the file cannot tell from a weight. TorchScript keeps
    buffers apart from parameters on its own."""
    match = _FX_ARGS.search(_metadata(node).get(_FX_NODE, ""))
    kinds = set(_FX_LIFTED.findall(match.group(1))) if match else set()
    return bool(kinds) and "p" not in kinds


class ScopeNamer:
    """Module paths for every node of a graph, with legacy reuse suffixes folded back.

    `scope(i)` is the module path of node i, with the legacy exporter's `relu_1` turned back
    into `relu` when `relu` was seen too and no parameter names a module `relu_1` (then it is
    the same module called a second time); the caller numbers repeated layers.
    """

    def __init__(self, nodes: Sequence[onnx.NodeProto],
                 parameter_names: Iterable[str] = ()) -> None:
        found = [_scope_and_origin(n) for n in nodes]
        known = {f[0] for f in found if f and f[0]}
        prefixes = _prefixes(known)
        real = _prefixes({o for o in map(owner_of, parameter_names) if o})
        self._scopes = [
            None if f is None else (self._fold_reuse(f[0], prefixes, real) if f[1] else f[0])
            for f in found
        ]

    @staticmethod
    def _fold_reuse(path: str, prefixes: set[str], real: set[str]) -> str:
        atoms = path.split(".")
        for i, atom in enumerate(atoms):
            match = _REUSE_SUFFIX.match(atom)
            if (match and ".".join(atoms[:i] + [match.group(1)]) in prefixes
                    and ".".join(atoms[:i + 1]) not in real):
                atoms[i] = match.group(1)
        return ".".join(atoms)

    def scope(self, index: int) -> str | None:
        return self._scopes[index]


def _prefixes(paths: Iterable[str]) -> set[str]:
    """Every module path and its ancestors: `a.b.c` -> `a`, `a.b`, `a.b.c`."""
    return {".".join(p.split(".")[:k]) for p in paths for k in range(1, p.count(".") + 2)}


def unique_names(names: Iterable[str]) -> list[str]:
    """Number repeats in order: `relu`, `relu#2`, `relu#3` (a module applied more than once)."""
    seen: dict[str, int] = {}
    taken = set()
    result = []
    for name in names:
        count = seen.get(name, 0) + 1
        seen[name] = count
        candidate = name if count == 1 else f"{name}#{count}"
        while candidate in taken:
            count += 1
            seen[name] = count
            candidate = f"{name}#{count}"
        taken.add(candidate)
        result.append(candidate)
    return result
