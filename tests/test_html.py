"""The HTML report: structure, log-scale geometry, escaping, offline-only content, before/after
curves, and a render in a real headless browser where one is installed."""

from __future__ import annotations

import math
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from sample_reports import hostile_report, report

from gradprobe.client.formats.html import render_html


class Page(HTMLParser):
    """Every element with its attributes, in document order, and the text."""

    VOID = {"meta", "br", "wbr", "img", "input", "link", "hr", "circle", "line", "rect", "path",
            "polyline"}

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.open: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag not in self.VOID:
            assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1:]}>"
            self.open.pop()

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict[str, str]]:
        return [attrs for name, attrs in self.elements if name == tag]


def test_structure_plots_and_findings():
    text = render_html([report(), report("models/clean.onnx", findings=[])])
    page = Page(text)
    assert not page.open  # every element closed, in order
    assert text.startswith("<!DOCTYPE html>")
    assert len(page.all("section")) == 2
    assert len(page.all("svg")) == 4  # activation variance and grad rms, per model
    body = "".join(page.text)
    assert "Activation variance by depth" in body and "Grad rms by depth" in body
    assert "97% of units are never active" in body
    assert "nn.init.kaiming_normal_(net[8].weight, nonlinearity='relu')" in body
    assert "he_normal(std=0.25, fan_in=32, fan_out=32)" in body
    assert "No findings." in body
    # The flagged layers of the first model are marked on both of its plots.
    flags = [t for t in re.findall(r'<g class="flag"><title>([^<]*)</title>', text)]
    assert flags.count("net.4: error dead-relu") == 2
    assert flags.count("net.8: warning vanishing-activations") == 2
    # Finding rows link to their layer's row.
    links = {a["href"] for a in page.all("a") if a["href"].startswith("#m0-layer-")}
    rows = {"#" + tr["id"] for tr in page.all("tr") if "id" in tr}
    assert links and links <= rows


def circles(svg: str) -> list[tuple[float, float, str]]:
    return [(float(x), float(y), tip) for x, y, tip in
            re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)"[^>]*><title>([^<]*)</title>', svg)]


def test_y_axis_is_logarithmic():
    decay = 0.3
    text = render_html([report(decay=decay)])
    activation_svg = text.split("<svg")[1]
    points = circles(activation_svg)
    assert len(points) == 12  # one per measured layer; the unmeasured head is skipped
    ys = [y for _, y, _ in points]
    steps = [b - a for a, b in zip(ys, ys[1:])]
    assert all(step > 0 for step in steps)  # variance falls: points go down the page
    assert max(steps) - min(steps) < 0.25  # equal ratios -> equal distances: a log axis
    # and the distance of one decade matches the tick spacing
    ticks = [float(y) for y in re.findall(r'<line x1="\d+" x2="[\d.]+" y1="([\d.]+)"',
                                          activation_svg)]
    decade = abs(ticks[1] - ticks[0])
    assert steps[0] == pytest.approx(-math.log10(decay) * decade, abs=0.2)
    assert re.search(r'10<tspan[^>]*>-6</tspan>', activation_svg)


def test_zero_and_nonfinite_values_stay_on_the_page():
    rep = report()
    rep.layers[3].activation.var = 0.0
    rep.layers[5].activation.var = float("nan")
    svg = render_html([rep]).split("<svg")[1]
    assert len(circles(svg)) == 10
    assert re.search(r'class="offscale"[^>]*>0<title>net.6 \([^)]*\): 0</title>', svg)
    assert re.search(r'class="offscale"[^>]*>!<title>net.10 \([^)]*\): nan', svg)
    # zeros sit on a labelled floor line, NaN on a labelled ceiling: no unlabeled marks
    assert 'class="ytick">0</text>' in svg and 'class="ytick">nan</text>' in svg
    assert svg.count("<polyline") == 2  # breaks at both gaps; net.8 alone is only a dot


def test_before_and_after_curves():
    before = report(decay=0.3)
    after = report(decay=0.9, findings=[before.findings[2]])
    text = render_html([after], before=[before])
    svgs = text.split("<svg")[1:]
    for svg in svgs:
        assert "before fix" in svg and "after fix" in svg
        # before: dashed, drawn after (over) the translucent "after" curve of its kind
        solid = svg.index('stroke-opacity="0.75"')
        dashed = svg.index('stroke-dasharray="6 4" stroke-opacity="0.9"')
        assert solid < dashed
    before_points = [p for p in circles(svgs[0]) if "(before fix)" in p[2]]
    after_points = [p for p in circles(svgs[0]) if "(after fix)" in p[2]]
    assert len(before_points) == len(after_points) == 12
    assert before_points[-1][1] > after_points[-1][1]  # before ends far lower on the page
    assert "Resolved by the fix (2)" in text
    # Layers flagged before the fix stay marked, in grey, with what was found there.
    assert 'net.4 (before fix): error dead-relu</title><line' in text
    assert re.search(r'<g class="flag"><title>net.4 \(before fix\)[^<]*</title><line [^>]*'
                     r'stroke="#9e9e9e"', text)
    assert "fixed from" in text
    with pytest.raises(ValueError):
        render_html([after], before=[])


def test_model_strings_are_escaped():
    text = render_html([hostile_report()])
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert "&lt;b&gt;reset&lt;/b&gt;" in text
    assert "&amp;amp;" in text  # an entity in a name stays text, not markup
    page = Page(text)
    assert not page.open
    for attrs in page.all("tr"):
        if "id" in attrs:
            assert re.fullmatch(r"[\w.\-]+", attrs["id"])


def test_offline_only():
    text = render_html([report(), hostile_report()], before=[report(), hostile_report()])
    page = Page(text)
    csp = [m["content"] for m in page.all("meta") if m.get("http-equiv") ==
           "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]
    assert not page.all("script") and not page.all("link") and not page.all("img")
    for name, attrs in page.elements:
        for key in ("src", "href"):
            assert attrs.get(key, "#").startswith("#"), (name, attrs)
    urls = set(re.findall(r"https?://[^\s\"'<>]+", text))
    assert urls <= {"http://www.w3.org/2000/svg"}  # a namespace name, never fetched


# ---------------------------------------------------------------- a real browser

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def run_browser(browser: str, page: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--enable-logging=stderr", "--v=0", "--log-level=0", *args, page.as_uri()],
        capture_output=True, text=True, timeout=120)


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if "Uncaught" in line or ("CONSOLE" in line and "ERROR" in line)
            or "Refused to" in line]


def png_pixels_vary(png: bytes) -> tuple[int, int, bool]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    data, pos = b"", 8
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IDAT":
            data += png[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(data)
    # A blank page compresses to a handful of byte values; text, badges and curves to many.
    return width, height, len(set(raw)) > 32


@pytest.mark.slow
def test_renders_in_headless_browser(tmp_path):
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium/Chrome binary on PATH (apt-get install chromium to run this)")
    # The console check must be able to fail: a page with a script error is caught.
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><p>x</p><script>undefinedFunction();</script>")
    assert console_errors(run_browser(browser, broken, "--dump-dom").stderr)

    page = tmp_path / "report.html"
    before = report(decay=0.3)
    page.write_text(render_html([report(decay=0.9), hostile_report()],
                                before=[before, hostile_report()]))
    shot = tmp_path / "shot.png"
    result = run_browser(browser, page, f"--screenshot={shot}", "--window-size=1200,1600")
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_errors(result.stderr) == []
    width, height, varied = png_pixels_vary(shot.read_bytes())
    assert (width, height) == (1200, 1600) and varied

    dom = run_browser(browser, page, "--dump-dom")
    assert console_errors(dom.stderr) == []
    assert dom.stdout.count("<svg") == 4 and "gradprobe fix report" in dom.stdout
    assert "<script" not in dom.stdout.lower()  # the hostile names stayed text


# ---------------------------------------------------------------- issue 13: a new user's page

def _conv_bn_relu_report():
    """Layers of three kinds in a row (conv, BN, ReLU), as every CNN has them."""
    from gradprobe.diagnostics.report import ActivationStats, GradientStats, LayerReport

    rep = report()
    layers = []
    for i in range(4):
        for role, op, var in (("linear", "Conv", 1.0), ("norm", "BatchNormalization", 0.9),
                              ("activation", "Relu", 0.3)):
            layers.append(LayerReport(
                name=f"block{i}.{op.lower()}", op=op, node=f"/block{i}/{op}", role=role,
                activation=ActivationStats(mean=0.0, var=var * 0.8 ** i, min=-1, max=1,
                                           zero_fraction=0.0, dead_units=0.0, saturation=0.0,
                                           nonfinite=0, units=8, numel=64, sample_var=var),
                gradient=GradientStats(norm=1.0, rms=0.1 * var, nonfinite=0)))
    rep.layers = layers
    rep.findings[0].layer = "block2.relu"
    return rep


def test_one_curve_per_kind_of_layer_no_zigzag():
    svg = render_html([_conv_bn_relu_report()]).split("<svg")[1]
    strokes = re.findall(r'<polyline [^>]*stroke="(#[0-9a-f]{6})"', svg)
    assert len(set(strokes)) == 3  # conv/linear, norm, activation: one line each
    for label in ("conv/linear", "norm", "activation"):
        assert f'class="legend">{label}</text>' in svg


def test_x_axis_names_layers_and_the_flagged_ones_stand_out():
    svg = render_html([_conv_bn_relu_report()]).split("<svg")[1]
    names = re.findall(r'<text [^>]*class="xname[^"]*"[^>]*>([^<]*)<title>', svg)
    assert "block0.conv" in names and "block2.relu" in names
    assert re.search(r'class="xname flagged"[^>]*>block2\.relu<', svg)


def test_many_layers_name_at_least_the_flagged_ones():
    rep = report(depth=60)
    svg = render_html([rep]).split("<svg")[1]
    names = re.findall(r'class="xname[^"]*"[^>]*>([^<]*)<title>', svg)
    flagged = {f.layer for f in rep.findings} & {layer.name for layer in rep.layers
                                                  if layer.activation is not None}
    assert flagged <= set(names) and len(names) < 20


def test_fix_code_wraps_between_arguments_not_inside_names():
    text = render_html([report()])
    assert "word-break:break-all" not in text.split("pre{")[1].split("}")[0]
    codes = re.findall(r"<pre><code>(.*?)</code></pre>", text, re.S)
    assert any("kaiming_normal_(<wbr>" in code for code in codes)
    for code in codes:
        for piece in code.split("<wbr>")[:-1]:  # every break lies after "(", ", " or a space
            assert piece.endswith(("(", ", ", " ")), piece


def test_plot_and_table_both_say_grad_rms():
    text = render_html([report()])
    assert "Grad rms by depth" in text and "<th>grad rms</th>" in text
    assert "gradient norm" not in text.lower() and "grad. norm" not in text
