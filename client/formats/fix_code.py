"""`gradprobe fix --emit-code FILE`: the re-initialisation as Python to paste into the code that
builds the model — one `nn.init` line per changed tensor with the exact numbers, so the source
of the model, not only the exported copy, starts from the fixed init."""

from __future__ import annotations

from gradprobe.diagnostics.repair import ChangedTensor, RepairOutcome


def _call(c: ChangedTensor, target: str) -> tuple[str, str]:
    """The nn.init call and what it is."""
    if c.scheme == "zeros":
        return f"nn.init.zeros_({target})", "zeros"
    if c.scheme == "lsuv":
        gain = f", gain={c.gain:.6g}" if c.gain else ""
        return f"nn.init.orthogonal_({target}{gain})", "LSUV: orthogonal, rescaled on the batch"
    if c.scheme.endswith("_uniform") and c.bound is not None:
        return f"nn.init.uniform_({target}, -{c.bound:.6g}, {c.bound:.6g})", c.scheme
    if c.std is not None:
        return f"nn.init.normal_({target}, mean=0.0, std={c.std:.6g})", c.scheme
    return "", f"{c.scheme} (no numbers recorded)"


def _named_in_user_code(c: ChangedTensor) -> bool:
    return bool(c.expr) and not c.expr.startswith("model.get_parameter(")


def render_fix_code(outcome: RepairOutcome) -> str:
    lines = [
        f'"""Re-initialisation found by `gradprobe fix {outcome.source}` (method '
        f'{outcome.method}, seed {outcome.after.seed}).',
        "",
        "Call apply_gradprobe_fix(model) once, right after the model is built and before",
        "training (or paste its lines into the model's own init code).",
        '"""',
        "",
        "import torch",
        "from torch import nn",
        "",
        "",
        "def apply_gradprobe_fix(model: nn.Module) -> None:",
        "    with torch.no_grad():",
    ]
    body = []
    for c in outcome.changed:
        why = ", ".join(c.reasons)
        if _named_in_user_code(c):
            call, what = _call(c, c.expr)
            body.append(f"        {call}  # {what}; {why}" if call
                        else f"        # {c.expr}: {what}; {why}")
        else:  # an exporter's name whose module path the file does not record
            call, what = _call(c, "TENSOR")
            body.append(f"        # {c.name} (layer {c.layer}; {why}): the file does not say "
                        f"which module holds it; apply to it: {call or what}")
    lines += body or ["        pass  # nothing to change: no finding asks for a new init"]
    return "\n".join(lines) + "\n"
