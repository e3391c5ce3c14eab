"""CI-facing output formats, each parsed back with a real parser and checked field by field.

SARIF is checked against the parts of SARIF 2.1.0 that GitHub code scanning requires (no schema
file ships on PyPI); JUnit with xml.etree; GitHub annotations with the runner's escaping rules;
GitLab Code Quality against the fields GitLab reads."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from urllib.parse import unquote

import pytest
from sample_reports import hostile_report, report, rule_catalogue

from gradprobe.client.formats import FORMATS, github, gitlab, junit, render, sarif
from gradprobe.diagnostics.report import Finding, Severity


@pytest.fixture
def catalogue():
    return rule_catalogue()


def strict_json(text: str):
    def reject(constant: str):
        raise ValueError(f"non-JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def two_models():
    return [report("models/mlp.onnx"), report("models/sub/other.onnx", findings=[])]


# ---------------------------------------------------------------- SARIF

def check_sarif(log: dict) -> None:
    """Required structure of a SARIF 2.1.0 log as code scanning reads it."""
    assert log["version"] == "2.1.0"
    assert log["$schema"].endswith("sarif-schema-2.1.0.json")
    assert isinstance(log["runs"], list) and log["runs"]
    for run in log["runs"]:
        driver = run["tool"]["driver"]
        assert driver["name"] == "gradprobe"
        ids = [rule["id"] for rule in driver["rules"]]
        assert len(ids) == len(set(ids))
        for rule in driver["rules"]:
            for key in ("shortDescription", "fullDescription", "help"):
                assert isinstance(rule[key]["text"], str) and rule[key]["text"].strip()
            assert rule["defaultConfiguration"]["level"] in {"error", "warning", "note"}
        for result in run["results"]:
            assert driver["rules"][result["ruleIndex"]]["id"] == result["ruleId"]
            assert result["level"] in {"error", "warning", "note"}
            assert result["message"]["text"].strip()
            for location in result["locations"]:
                physical = location["physicalLocation"]
                assert physical["artifactLocation"]["uri"]
                assert physical["region"]["startLine"] >= 1
                index = physical["artifactLocation"]["index"]
                assert (run["artifacts"][index]["location"]["uri"]
                        == physical["artifactLocation"]["uri"])
                for logical in location["logicalLocations"]:
                    assert logical["name"] and logical["fullyQualifiedName"] and logical["kind"]
            fingerprints = result["partialFingerprints"]
            assert fingerprints and all(isinstance(v, str) and v for v in fingerprints.values())


def test_sarif_structure_rules_and_results(catalogue):
    log = strict_json(render("sarif", two_models()))
    check_sarif(log)
    run = log["runs"][0]
    rules = {rule["id"]: rule for rule in run["tool"]["driver"]["rules"]}
    # Every rule of the catalogue is described, not only those that fired.
    assert set(rules) == {doc.name for doc in catalogue}
    dead = next(doc for doc in catalogue if doc.name == "dead-relu")
    assert rules["dead-relu"]["shortDescription"]["text"] == dead.summary
    assert dead.why in rules["dead-relu"]["fullDescription"]["text"]
    assert rules["dead-relu"]["help"]["text"] == dead.full_text()

    results = run["results"]
    assert [r["ruleId"] for r in results] == ["vanishing-activations", "dead-relu", "zero-weights"]
    assert [r["level"] for r in results] == ["warning", "error", "note"]
    dead_result = results[1]
    location = dead_result["locations"][0]
    assert location["physicalLocation"]["artifactLocation"] == {
        "uri": "models/mlp.onnx", "uriBaseId": "%SRCROOT%", "index": 0}
    layer, *nodes = location["logicalLocations"]
    assert layer == {"name": "net.4", "fullyQualifiedName": "net.4", "kind": "module",
                     "decoratedName": "/net/net.4/Gemm"}
    assert [n["name"] for n in nodes] == ["/net/net.4/Gemm", "/net/net.5/Relu"]
    assert "97% of units are never active" in dead_result["message"]["text"]
    assert "nn.init.zeros_(net[4].bias)" in dead_result["message"]["text"]
    assert dead_result["properties"]["evidence"] == {"dead_units": 0.97}
    # Both model files are artifacts, with their hash, even the clean one.
    assert [a["location"]["uri"] for a in run["artifacts"]] == ["models/mlp.onnx",
                                                                "models/sub/other.onnx"]
    assert run["artifacts"][0]["hashes"]["sha-256"] == "ab" * 32


def test_sarif_fingerprints_stable_across_runs_and_numbers():
    first = strict_json(render("sarif", two_models()))
    second = strict_json(render("sarif", two_models()))
    assert first == second  # deterministic: no timestamps, stable order

    # New numbers and wording for the same problem keep the identity ...
    changed = report("models/mlp.onnx")
    for finding in changed.findings:
        finding.message = "reworded " + finding.message
        finding.evidence = {"dead_units": 0.5}
    third = strict_json(render("sarif", [changed]))
    prints = [r["partialFingerprints"] for r in first["runs"][0]["results"]]
    assert prints == [r["partialFingerprints"] for r in third["runs"][0]["results"]]
    assert len({json.dumps(p) for p in prints}) == len(prints)
    # ... the same findings in another file are other alerts.
    moved = strict_json(render("sarif", [report("models/copy.onnx")]))
    assert not {json.dumps(p) for p in prints} & {
        json.dumps(r["partialFingerprints"]) for r in moved["runs"][0]["results"]}


def test_sarif_nonfinite_evidence_and_hostile_names_stay_valid():
    rep = report()
    rep.findings[0].evidence = {"variance": float("nan"), "ratio": float("inf")}
    log = strict_json(sarif.render([rep, hostile_report()], fail_on="error"))
    check_sarif(log)
    assert log["runs"][0]["results"][0]["properties"]["evidence"] == {"variance": "nan",
                                                                      "ratio": "inf"}
    uri = log["runs"][0]["artifacts"][1]["location"]["uri"]
    assert " " not in uri and "<" not in uri
    assert unquote(uri) == "weird dir/m,o:d%el<1>.onnx"


def test_sarif_absolute_path_outside_working_tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = strict_json(sarif.render([report("/elsewhere/m.onnx")], fail_on="error"))
    location = log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"] == "file:///elsewhere/m.onnx"
    assert "uriBaseId" not in location["artifactLocation"]


# ---------------------------------------------------------------- JUnit

@pytest.mark.parametrize("fail_on, failures", [("error", 1), ("warning", 2), ("info", 3),
                                               ("never", 0)])
def test_junit_counts_follow_fail_on(catalogue, fail_on, failures):
    root = ET.fromstring(junit.render(two_models(), fail_on=fail_on))
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["models/mlp.onnx", "models/sub/other.onnx"]
    first, clean = suites
    cases = first.findall("testcase")
    rules = {doc.name for doc in catalogue}
    # One case per (rule, layer) reported, plus one per rule that reported nothing.
    fired = {("vanishing-activations", "net.8"), ("dead-relu", "net.4"), ("zero-weights", "net.head")}
    assert len(cases) == len(fired) + len(rules - {r for r, _ in fired})
    assert {c.get("name") for c in cases} >= {f"{r}: {layer}" for r, layer in fired}
    assert int(first.get("tests")) == len(cases)
    assert int(first.get("failures")) == failures == len(first.findall("testcase/failure"))
    assert len(clean.findall("testcase")) == len(rules)
    assert clean.findall("testcase/failure") == [] and clean.get("failures") == "0"
    assert int(root.get("failures")) == failures
    assert int(root.get("tests")) == len(cases) + len(rules)
    if failures:
        dead = next(c for c in cases if c.get("name") == "dead-relu: net.4")
        failure = dead.find("failure")
        assert failure.get("type") == "error"
        assert "97% of units" in failure.get("message")
        assert "nn.init.zeros_(net[4].bias)" in failure.text
    if fail_on == "error":  # below the bar: a pass, with the finding kept as output
        vanishing = next(c for c in cases if c.get("name") == "vanishing-activations: net.8")
        assert vanishing.find("failure") is None
        assert "he_normal" in vanishing.find("system-out").text


def test_junit_escapes_markup_and_control_characters():
    rep = hostile_report()
    rep.findings[0].message += "\x00\x1b[31m"
    root = ET.fromstring(junit.render([rep], fail_on="error"))
    failure = root.find("testsuite/testcase/failure")
    assert '<script>alert("x")</script>' in failure.get("message")
    assert "\x00" not in failure.text


# ---------------------------------------------------------------- GitHub annotations

ANNOTATION = re.compile(r"^::(error|warning|notice) (?P<props>[^:]*)::(?P<message>.*)$")


def unescape(text: str) -> str:
    for code, char in (("%0D", "\r"), ("%0A", "\n"), ("%3A", ":"), ("%2C", ","), ("%25", "%")):
        text = text.replace(code, char)
    return text


def parse_annotations(text: str) -> list[tuple[str, dict[str, str], str]]:
    found = []
    for line in text.splitlines():
        match = ANNOTATION.match(line)
        if match:
            props = dict(p.split("=", 1) for p in match["props"].split(","))
            found.append((match[1], {k: unescape(v) for k, v in props.items()},
                          unescape(match["message"])))
    return found


def test_github_annotations_one_per_finding():
    text = github.render(two_models(), fail_on="error")
    annotations = parse_annotations(text)
    assert [a[0] for a in annotations] == ["warning", "error", "notice"]
    level, props, message = annotations[1]
    assert props == {"file": "models/mlp.onnx", "title": "gradprobe dead-relu (net.4)"}
    assert message.startswith("net.4: 97% of units are never active")
    assert "Fix:" in message
    assert text.splitlines()[-1].startswith("gradprobe: 1 error(s), 1 warning(s), 1 info")


def test_github_escaping_round_trips_hostile_strings():
    rep = hostile_report()
    text = github.render([rep], fail_on="error")
    lines = text.splitlines()
    assert len(lines) == 2  # newlines inside the message never split a command
    [(level, props, message)] = parse_annotations(text)
    layer = rep.findings[0].layer
    assert props["file"] == "weird dir/m,o:d%el<1>.onnx"
    assert props["title"] == f"gradprobe dead-relu ({layer})"
    assert message.startswith(f"{layer}: layer {layer} is dead: 100%")
    assert "\r" not in lines[0] and "%0D%0A" in lines[0]
    raw_props = ANNOTATION.match(lines[0])["props"]
    assert raw_props.count(",") == 1 and ":" not in raw_props


def test_github_escape_functions():
    assert github.escape_data("50%\r\nx:y,z") == "50%25%0D%0Ax:y,z"
    assert github.escape_property("50%\r\nx:y,z") == "50%25%0D%0Ax%3Ay%2Cz"


# ---------------------------------------------------------------- GitLab Code Quality

def test_gitlab_code_quality_fields():
    issues = strict_json(gitlab.render(two_models(), fail_on="error"))
    assert isinstance(issues, list) and len(issues) == 3
    for issue in issues:
        assert issue["description"].strip() and issue["check_name"]
        assert issue["severity"] in {"info", "minor", "major", "critical", "blocker"}
        assert issue["location"]["path"] == "models/mlp.onnx"
        assert issue["location"]["lines"]["begin"] == 1
        assert re.fullmatch(r"[0-9a-f]{32}(:\d+)?", issue["fingerprint"])
    assert [i["severity"] for i in issues] == ["minor", "major", "info"]
    assert [i["check_name"] for i in issues] == ["vanishing-activations", "dead-relu",
                                                 "zero-weights"]
    assert "Fix: " in issues[1]["content"]["body"]


def test_gitlab_fingerprints_unique_even_for_repeated_findings():
    rep = report()
    twin = Finding(rule="dead-relu", severity=Severity.ERROR, layer="net.4",
                   parameters=["net.4.bias", "net.4.weight"], message="again")
    rep.findings.append(twin)
    issues = strict_json(gitlab.render([rep, hostile_report()], fail_on="error"))
    prints = [i["fingerprint"] for i in issues]
    assert len(prints) == len(set(prints)) == 5
    assert prints[3] == prints[1] + ":2"


def test_registry_names_every_format():
    assert {"sarif", "junit", "github", "gitlab"} <= set(FORMATS)
    for name in ("sarif", "junit", "github", "gitlab"):
        assert render(name, [report()]).strip()
