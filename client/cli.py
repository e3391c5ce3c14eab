"""The `gradprobe` command. Domain errors are mapped to exit code 2 here, once.

Exit codes: 0 clean (nothing at or above --fail-on), 1 findings at or above it, 2 bad usage or a
bad model file (one line on stderr), 3 an internal fault (a bug in gradprobe: please report it).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

from gradprobe.client.formats import FORMATS, Unlinted, render
from gradprobe.diagnostics.errors import GradprobeError
from gradprobe.diagnostics.options import DTYPES, DiagnoseOptions, parse_shape

EXIT_CLEAN, EXIT_FINDINGS, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class UsageError(GradprobeError):
    """Flags that do not fit together."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as for every other bad input
        self.exit(EXIT_USAGE, f"gradprobe: error: {message} (see '{self.prog} --help')\n")


def _shape(text: str) -> list[int]:
    try:
        return parse_shape(text)
    except GradprobeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rule_list(text: str) -> list[str]:
    return [r.strip() for r in text.split(",") if r.strip()]


def add_probe_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by `lint` and `fix`: what to feed the model and where to run it."""
    p.add_argument("--input-shape", action="append", type=_shape, metavar="AxBxC",
                   help="shape of one model input, repeat once per input in order (e.g. 8x3x224x224)")
    p.add_argument("--input-dtype", action="append", choices=DTYPES, metavar="DTYPE",
                   help=f"dtype of the inputs: once for all, or once per input ({', '.join(DTYPES)})")
    p.add_argument("--input", dest="input_file", metavar="FILE",
                   help="real input data instead of the synthetic batch (.npy, .npz, .pt)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="batch size used where the file leaves the batch dimension free (default 8)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None,
                   help="where to run the probe (default auto: a GPU when there is one)")
    p.add_argument("--seed", type=int, default=None, help="seed of the probe batch (default 0)")
    p.add_argument("--format-of-model", dest="model_format", choices=("onnx", "torchscript", "pt2"),
                   default=None, help="read the file as this format instead of detecting it")
    p.add_argument("--config", type=Path, metavar="FILE", help="configuration file (default: "
                   "nearest gradprobe.toml, or pyproject.toml with [tool.gradprobe])")


def build_parser(*, serve_arguments: bool = True) -> argparse.ArgumentParser:
    """`serve_arguments=False` leaves out the server's flags, whose module imports grpc: the
    commands that do not serve start faster without it."""
    parser = _Parser(prog="gradprobe", description="Lint a neural network at initialisation: "
                     "activation and gradient probes, with the init that fixes what they find.")
    parser.add_argument("--version", action="version", version="gradprobe 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    lint = sub.add_parser("lint", help="probe model files and report findings")
    lint.add_argument("models", nargs="+", type=Path, metavar="MODEL",
                      help="ONNX (.onnx) or TorchScript (.pt) file, or a folder of them")
    add_probe_arguments(lint)
    lint.add_argument("--format", choices=sorted(FORMATS), default=None,
                      help="report format (default text)")
    lint.add_argument("--output", "-o", type=Path, metavar="FILE", help="write the report here")
    lint.add_argument("--fail-on", choices=("error", "warning", "info", "never"), default=None,
                      help="lowest severity that makes the exit code 1 (default error)")
    lint.add_argument("--select", type=_rule_list, metavar="RULES", help="only these rules (comma-separated)")
    lint.add_argument("--ignore", type=_rule_list, metavar="RULES", help="skip these rules (comma-separated)")
    baseline = lint.add_mutually_exclusive_group()
    baseline.add_argument("--baseline", type=Path, metavar="FILE",
                          help="report only findings not recorded in this baseline")
    baseline.add_argument("--write-baseline", type=Path, metavar="FILE",
                          help="record every current finding in FILE and exit 0")
    lint.add_argument("--html", type=Path, metavar="FILE",
                      help="also write a self-contained HTML report with plots")
    lint.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                      help="at most N models in parallel (default: as cores and memory allow; "
                           "with --server, one per replica)")
    lint.add_argument("--mlflow", action="store_true",
                      help="log the reports, counts and verdict to MLflow (MLFLOW_TRACKING_URI, "
                           "MLFLOW_EXPERIMENT_NAME, MLFLOW_RUN_ID; needs gradprobe[mlflow])")
    lint.add_argument("--server", metavar="HOST:PORT[,HOST:PORT...]",
                      help="run the probes on gradprobe servers: one, several replicas "
                           "(jobs spread round robin) or dns:///NAME:PORT")
    token = lint.add_mutually_exclusive_group()
    token.add_argument("--token-file", type=Path, metavar="FILE",
                       help="file holding the bearer token for --server (default: the "
                            "GRADPROBE_TOKEN environment variable)")
    token.add_argument("--token", help="bearer token for --server; visible to other users in "
                                       "the process list: prefer --token-file or GRADPROBE_TOKEN")
    lint.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA bundle to verify --server's TLS")
    lint.add_argument("--tls-cert", type=Path, metavar="PEM",
                      help="client certificate for a server that requires mTLS (with --tls-key)")
    lint.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
    lint.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                      help="deadline of a --server request")
    lint.set_defaults(run=run_lint)

    rules = sub.add_parser("rules", help="list every rule, one line each")
    rules.set_defaults(run=run_rules)
    rule = sub.add_parser("rule", help="print a rule's documentation")
    rule.add_argument("name")
    rule.set_defaults(run=run_rule)

    fix = sub.add_parser("fix", help="write a copy of the model with flagged weights re-initialised")
    fix.add_argument("model", type=Path, metavar="MODEL")
    fix.add_argument("-o", "--output", type=Path, required=True, metavar="FIXED")
    fix.add_argument("--html", type=Path, metavar="FILE",
                     help="also write an HTML page with the curves before and after the fix")
    fix.add_argument("--init", choices=("auto", "lsuv"), default="auto",
                     help="auto: the scheme each finding names (He/Xavier/LeCun); lsuv: "
                          "layer-sequential unit-variance init on the probe batch")
    fix.add_argument("--select", type=_rule_list, metavar="RULES",
                     help="only fix what these rules find (comma-separated)")
    fix.add_argument("--ignore", type=_rule_list, metavar="RULES",
                     help="leave what these rules find as it is (comma-separated)")
    fix.add_argument("--emit-code", type=Path, metavar="FILE.py",
                     help="also write the change as Python: the nn.init lines for the model's code")
    fix.add_argument("--verbose", "-v", action="store_true",
                     help="the layer table before/after, every tensor left alone, every finding")
    add_probe_arguments(fix)
    fix.set_defaults(run=run_fix)

    serve = sub.add_parser("serve", help="run the gRPC service")
    add_serve_arguments = None
    if serve_arguments:
        try:
            from gradprobe.server.main import add_serve_arguments
        except ImportError:  # the service is optional in a stripped-down install
            pass
    if add_serve_arguments is not None:
        add_serve_arguments(serve)
    serve.set_defaults(run=run_serve)
    return parser


def _remote_client(args: argparse.Namespace):  # noqa: ANN202 - a gradprobe Client
    """One connection for the whole run, shared by its threads (round robin over --server)."""
    from gradprobe.client.api import Client

    token = args.token or _read_token(args.token_file) or os.environ.get("GRADPROBE_TOKEN")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    return Client(args.server, token=token, tls_ca=args.tls_ca, client_cert=args.tls_cert,
                  client_key=args.tls_key, timeout_s=args.timeout)


def _read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read --token-file {path}: {exc.strerror or exc}") from None
    if not token:
        raise UsageError(f"--token-file {path} is empty")
    return token


def run_lint(args: argparse.Namespace) -> int:
    from gradprobe.client import baseline
    from gradprobe.client.config import load_config, overrides_from_args
    from gradprobe.client.discover import expand_paths
    from gradprobe.client.lint_many import lint_files
    from gradprobe.client.progress import Progress

    config = load_config(args.config, Path.cwd()).with_overrides(**overrides_from_args(args))
    options_for, triton_versions = _with_triton_inputs(args.models, config)
    skipped: list = []
    paths = expand_paths(args.models, skipped)
    remote = client = None
    jobs = args.jobs
    if args.server:  # the servers do the work: --jobs requests in flight, one per replica by default
        client = _remote_client(args)
        jobs = jobs or len(args.server.split(","))

        def remote(path: Path, options: DiagnoseOptions, hook: object) -> object:
            return client.diagnose(path, options, progress=hook, path_label=str(path))
    if len(paths) > 1 or any(p.is_dir() for p in args.models):
        # One --input-shape/--batch-size for many files fills in what a file leaves open; a
        # file that declares its own fixed shapes keeps them.
        per_file = options_for

        def options_for(path: Path) -> DiagnoseOptions:
            if path.resolve() in triton_versions:  # its config.pbtxt says what it takes
                return per_file(path)
            return per_file(path).model_copy(update={"fill_undeclared": True})
    try:
        with Progress(len(paths)) as progress:
            outcomes = lint_files(paths, options_for, jobs=jobs, progress=progress,
                                  diagnose=remote)
    finally:
        if client is not None:
            client.close()
    for outcome in outcomes:
        version = triton_versions.get(outcome.path.resolve())
        if version is not None and outcome.report is not None:
            outcome.report.model.notes.append(version.note)
    for failed in (o for o in outcomes if not o.ok):  # one line each; the others still count
        if failed.detail and os.environ.get("GRADPROBE_DEBUG"):
            print(failed.detail, file=sys.stderr)
        print(f"gradprobe: error: {_naming(failed.path, failed.error or '')}", file=sys.stderr)
    if len(paths) > 1 and any("no declared shape" in (o.error or "") for o in outcomes):
        print("gradprobe: hint: one --input-shape applies to every file; give TorchScript "
              "files their shapes per file pattern in [tool.gradprobe.input-shapes] of "
              "pyproject.toml (docs/integrations.md, Configuration)", file=sys.stderr)
    reports = [o.report for o in outcomes if o.report is not None]
    if args.write_baseline:
        recorded = baseline.write_baseline(args.write_baseline, reports)
        print(f"gradprobe: recorded {len(recorded.entries)} finding(s) in {args.write_baseline}",
              file=sys.stderr)
    elif args.baseline:
        known = baseline.read_baseline(args.baseline)
        new = baseline.filter_new(reports, known)
        hidden = baseline.suppressed_count(reports, new)
        if hidden:
            print(f"gradprobe: {hidden} finding(s) hidden by baseline {args.baseline}",
                  file=sys.stderr)
        reports = new
    unlinted = [Unlinted(str(o.path), _naming(o.path, o.error or ""), failed=True)
                for o in outcomes if not o.ok]
    unlinted += [Unlinted(str(s.path), f"{s.path.name} {s.reason}", failed=False, kind=s.kind)
                 for s in skipped]
    _write(render(config.format or "text", reports, fail_on=config.fail_on, unlinted=unlinted),
           args.output)
    if args.html:
        from gradprobe.client.formats.html import render_html

        _write(render_html(reports), args.html)
    if args.mlflow and reports:
        _log_to_mlflow(reports, config.fail_on)
    if any(o.internal for o in outcomes):
        return EXIT_INTERNAL
    if any(not o.ok for o in outcomes):
        return EXIT_USAGE
    if args.write_baseline:
        return EXIT_CLEAN
    return EXIT_FINDINGS if any(r.fails(config.fail_on) for r in reports) else EXIT_CLEAN


def _naming(path: Path, error: str) -> str:
    """The error with the file's name in front, once: most loader messages already start with
    it (`x.pth is a ...`, `x.onnx: truncated ...`)."""
    return error if error.startswith((str(path), path.name)) else f"{path}: {error}"


def _with_triton_inputs(arguments: list[Path], config: object) -> tuple:
    """Options per file, with the inputs of Triton model versions taken from their
    config.pbtxt (unless the user gave shapes); and file -> its Triton version."""
    from gradprobe.client import triton

    base = config.options_for  # type: ignore[attr-defined]
    batch = getattr(config, "batch_size", None) or DiagnoseOptions().batch_size
    versions = {path.resolve(): v
                for path, v in triton.scan([p for p in arguments if p.is_dir()], batch).items()}

    def options_for(path: Path) -> DiagnoseOptions:
        options = base(path)
        version = versions.get(path.resolve())
        if version is None or options.input_shapes is not None:
            return options
        return version.options(options)
    return options_for, versions


def _log_to_mlflow(reports: list, fail_on: str) -> None:
    try:
        from gradprobe.integrations.mlflow import log_reports
    except ImportError:
        raise UsageError("--mlflow needs MLflow: pip install 'gradprobe[mlflow]'") from None
    run_id = log_reports(reports, fail_on=fail_on)
    print(f"gradprobe: logged {len(reports)} report(s) to MLflow run {run_id}", file=sys.stderr)


def _write(text: str, output: Path | None) -> None:
    if output is None:
        if not text.strip():  # nothing to show (every file failed): no stray blank line
            return
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    try:
        output.write_text(text if text.endswith("\n") else text + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror}") from None


def run_rules(args: argparse.Namespace) -> int:
    from gradprobe.diagnostics.rule_catalog import rule_rows

    rows = rule_rows()
    width = max(len(verdicts) for _, verdicts, _ in rows)
    for name, verdicts, summary in rows:
        print(f"{name:<24} {verdicts:<{width}}  {summary}")
    return EXIT_CLEAN


def run_rule(args: argparse.Namespace) -> int:
    from gradprobe.diagnostics.rule_catalog import rule_text

    print(rule_text(args.name))
    return EXIT_CLEAN


def run_fix(args: argparse.Namespace) -> int:
    from gradprobe.client.formats.comparison import render_comparison
    from gradprobe.diagnostics.repair import repair

    from gradprobe.client.config import load_config, overrides_from_args

    # The same configuration as `lint` (file, then flags), so a model fixes as it lints.
    config = load_config(args.config, Path.cwd()).with_overrides(**overrides_from_args(args))
    outcome = repair(args.model, args.output, config.options_for(args.model), method=args.init)
    print(render_comparison(outcome, verbose=args.verbose))
    if args.emit_code:
        from gradprobe.client.formats.fix_code import render_fix_code

        _write(render_fix_code(outcome), args.emit_code)
        print(f"gradprobe: wrote the nn.init lines to {args.emit_code}", file=sys.stderr)
    if args.html:
        from gradprobe.client.formats.html import render_html

        _write(render_html([outcome.after], before=[outcome.before]), args.html)
    return EXIT_FINDINGS if outcome.after.fails("error") else EXIT_CLEAN


def run_serve(args: argparse.Namespace) -> int:
    from gradprobe.server.main import serve_from_args

    return serve_from_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    # torch.jit.load/trace announce their own deprecation on every call: noise to a user who
    # is linting a file, not writing torch code.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    # Only `serve` needs the server's flags (and grpc); --version, rules, lint start without.
    parser = build_parser(serve_arguments=command == "serve")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return args.run(args)
    except GradprobeError as exc:
        from gradprobe.client.advice import cli_message

        print(f"gradprobe: error: {cli_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gradprobe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_CLEAN
    except Exception as exc:  # a bug in gradprobe, not the user's input
        if os.environ.get("GRADPROBE_DEBUG"):
            traceback.print_exc()
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"gradprobe: internal error: {type(exc).__name__}: {detail} "
              f"(set GRADPROBE_DEBUG=1 for the traceback; please report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
