"""The hub sweep runs over days and the linter changes under it: each verdict records the linter
version that produced it, the scorecard says how many came from older versions, and
`--rerun-stale` lints exactly those again (never the files the linter did not judge)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import hub_sweep  # noqa: E402


def row(model: str, export: str, status: str, linter: str | None, alarms=()) -> dict:  # noqa: ANN001
    r = {"library": "timm", "model": model, "export": export, "status": status,
         "alarms": list(alarms)}
    if linter:
        r["linter"] = linter
    return r


def test_version_follows_the_diagnostics_sources(tmp_path):
    (tmp_path / "diagnostics" / "rules").mkdir(parents=True)
    rule = tmp_path / "diagnostics" / "rules" / "a.py"
    rule.write_text('"""A rule."""\n\n\ndef f():\n    """Why."""\n    return 1\n')
    (tmp_path / "bench.py").write_text("outside the linter\n")
    first = hub_sweep.linter_version(tmp_path)
    (tmp_path / "bench.py").write_text("changed, still outside\n")
    assert hub_sweep.linter_version(tmp_path) == first
    # documentation and formatting are not the linter's decisions
    rule.write_text('"""A rule, better told."""\n\n\ndef f():  # a comment\n'
                    '    """Why, at length."""\n\n    return (1)\n')
    assert hub_sweep.linter_version(tmp_path) == first
    rule.write_text('"""A rule."""\n\n\ndef f():\n    """Why."""\n    return 2\n')
    assert hub_sweep.linter_version(tmp_path) != first
    assert hub_sweep.linter_version() == hub_sweep.linter_version()


def test_code_stamp_sees_an_edit_the_version_ignores(tmp_path):
    """A worker imports modules as it needs them: an edit landing while it lints can mix old
    and new code (two timm LeViT files crashed so), and its verdict must not pass for either
    version's. The stamp catches any change to a file, documentation too."""
    (tmp_path / "diagnostics").mkdir()
    rule = tmp_path / "diagnostics" / "a.py"
    rule.write_text('def f():\n    """Why."""\n    return 1\n')
    stamp, version = hub_sweep.code_stamp(tmp_path), hub_sweep.linter_version(tmp_path)
    assert hub_sweep.code_stamp(tmp_path) == stamp
    rule.write_text('def f():\n    """Why, at length."""\n    return 1\n')
    assert hub_sweep.code_stamp(tmp_path) != stamp
    assert hub_sweep.linter_version(tmp_path) == version


def test_version_is_of_the_code_the_sweep_imports_not_of_its_folder(tmp_path, monkeypatch):
    """A sweep run from another checkout of the repository (a git worktree beside the one the
    environment was installed from) lints with the installed package's code: its verdicts must
    carry that code's version, not the hash of the `diagnostics/` beside the script."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "diagnostics").mkdir()
    (tmp_path / "diagnostics" / "other.py").write_text("DECIDES = 'something else'\n")
    script = shutil.copy(hub_sweep.__file__, tmp_path / "bench" / "hub_sweep.py")
    spec = importlib.util.spec_from_file_location("hub_sweep_elsewhere", script)
    elsewhere = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, elsewhere)  # its dataclasses look it up there
    spec.loader.exec_module(elsewhere)
    assert elsewhere.ROOT == tmp_path
    assert elsewhere.linter_version() == hub_sweep.linter_version()
    assert elsewhere.linter_version() != elsewhere.linter_version(tmp_path)


def test_rerun_stale_picks_only_verdicts_of_older_versions():
    rows = [row("a", "torchscript", "linted", "old"),
            row("a", "onnx_legacy", "linted", "new"),
            row("b", "torchscript", "too-large", None),
            row("c", "torchscript", "crashed", None),
            row("d", "torchscript", "linted", "old"),
            row("d", "torchscript", "linted", "new")]  # rerun already: the latest counts
    models = [("timm", m) for m in "abcde"]
    exports = ["torchscript", "onnx_legacy"]
    assert hub_sweep.pending(models, exports, rows, "new") == [
        ("timm", "b", ["onnx_legacy"]), ("timm", "c", ["onnx_legacy"]),
        ("timm", "d", ["onnx_legacy"]), ("timm", "e", exports)]
    assert hub_sweep.pending(models, exports, rows, "new", rerun_stale=True) == [
        ("timm", "a", ["torchscript"]), ("timm", "b", ["onnx_legacy"]), ("timm", "c", exports),
        ("timm", "d", ["onnx_legacy"]), ("timm", "e", exports)]


def test_scorecard_counts_stale_verdicts():
    rows = [row("a", "torchscript", "linted", "old"), row("b", "torchscript", "linted", "new"),
            row("c", "torchscript", "too-large", None), row("a", "torchscript", "linted", "new"),
            row("e", "torchscript", "linted", None)]
    card = hub_sweep.scorecard(rows, version="new")
    assert card["linter"] == {"current": "new", "files": {"new": 2, "unrecorded": 1},
                              "stale": 1}
    text = hub_sweep.markdown(card, {"date": "today", "how": "test"})
    assert "1 of the verdicts above come from older versions (unrecorded: 1)" in text
    fresh = hub_sweep.scorecard(rows[:4], version="new")
    assert "every verdict above is from it" in hub_sweep.markdown(fresh, {"date": "", "how": ""})


def test_untrainable_library_defaults_are_counted_apart_from_false_alarms():
    """cpmant's init_std=1.0 and SAM's 1e-10 are defaults for loading weights: a finding on
    them is the linter being right, and a clean file a miss. They never count as false alarms."""
    alarm = {"rule": "init-scale", "severity": "warning", "layer": "l", "message": "m"}

    def tf(model: str, alarms=()) -> dict:  # noqa: ANN001
        return {**row(model, "torchscript", "linted", "v", alarms), "library": "transformers"}

    rows = [tf("cpmant", [alarm]), tf("sam_vision_model"), tf("bert"), tf("gpt2", [alarm])]
    card = hub_sweep.scorecard(rows, None, None, "v")
    counts = card["counts"]["transformers"]
    assert (counts["clean"], counts["false_alarm_files"]) == (1, 1)
    assert (counts["flagged_untrainable_default"], counts["missed"]) == (1, 1)
    assert card["false_alarms"]["init-scale"]["models"] == ["transformers/gpt2:torchscript"]
    assert [(u["model"], u["flagged"]) for u in card["untrainable_defaults"]] == [
        ("transformers/cpmant:torchscript", True),
        ("transformers/sam_vision_model:torchscript", False)]
    assert "**missed**" in hub_sweep.markdown(card, {"date": "d", "how": "h"})
