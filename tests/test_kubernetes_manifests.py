"""deploy/kubernetes checked two ways, offline: every manifest against the Kubernetes API schemas
of pinned versions (kubernetes-validate, strict: an unknown or misspelt field fails), and against
reality: the image (parsed from the Dockerfile), `gradprobe serve`'s own argument parser, the
health check's parser, and each other (ports, paths, grace period, selectors).

The kustomizations are rendered by a small reader of the subset they use (resources,
components, JSON 6902 patches), so that no kustomize binary is needed; where kubectl is
installed, its own kustomize renders the same. The last tests break a copy of the manifests in
tmp_path, one fact at a time, and expect the checks to say so.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")  # a dependency of kubernetes-validate

from gradprobe.diagnostics.errors import ConfigError  # noqa: E402
from gradprobe.server import healthcheck  # noqa: E402
from gradprobe.server.main import add_serve_arguments, config_from_args  # noqa: E402
from gradprobe.server.metrics import ServerMetrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests claim (native gRPC probes: 1.27; the preStop sleep
# action: beta, on by default, in 1.30) and the newest kubernetes-validate 1.37.0 knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# What `kubectl apply -k` is pointed at (README); components are checked through these.
KUSTOMIZATIONS = ("base", "overlays/gpu", "overlays/tls")
# Custom resources: no schema in kubernetes-validate, checked by structure below.
CUSTOM_RESOURCES = ("monitoring/servicemonitor.yaml", "examples/certificate.yaml")
CORE_EXAMPLES = ("examples/token-secret.yaml",)
SERVER_OVERHEAD_MIB = 1024  # the server process beside its workers (docs/security.md)
GIB = 1 << 30


# ---------------------------------------------------------------- rendering kustomizations

def _load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), f"JSON pointer must start with /: {path!r}"
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _apply_json_patch(document: dict, operations: list[dict]) -> None:
    """RFC 6902 add/replace/remove, the operations the components use."""
    for operation in operations:
        *parents, last = _pointer(operation["path"])
        node: Any = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        op = operation["op"]
        if isinstance(node, list):
            if op == "add" and last == "-":
                node.append(copy.deepcopy(operation["value"]))
            elif op == "add":
                node.insert(int(last), copy.deepcopy(operation["value"]))
            elif op == "replace":
                node[int(last)] = copy.deepcopy(operation["value"])
            elif op == "remove":
                del node[int(last)]
            else:
                raise ValueError(f"unsupported JSON patch op {op!r}")
        elif op == "add" or (op == "replace" and last in node):
            node[last] = copy.deepcopy(operation["value"])
        elif op == "remove" and last in node:
            del node[last]
        else:
            raise ValueError(f"JSON patch {op} {operation['path']}: no such field")


def _apply_patches(directory: Path, spec: dict, resources: list[dict]) -> None:
    for patch in spec.get("patches", []):
        assert set(patch) == {"path", "target"}, f"{directory}: patch form {sorted(patch)}"
        operations = yaml.safe_load((directory / patch["path"]).read_text())
        assert isinstance(operations, list), f"{patch['path']}: not a JSON 6902 patch"
        targets = [r for r in resources if r["kind"] == patch["target"]["kind"]
                   and r["metadata"]["name"] == patch["target"]["name"]]
        assert targets, f"{directory}: patch {patch['path']} matches no resource"
        for target in targets:
            _apply_json_patch(target, operations)


def render(directory: Path) -> list[dict]:
    """The resources `kubectl kustomize directory` prints, for the subset used here."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert spec["kind"] == "Kustomization", f"{directory}: a {spec['kind']}, not a Kustomization"
    unknown = set(spec) - {"apiVersion", "kind", "resources", "components", "patches"}
    assert not unknown, f"{directory}: kustomization fields this reader lacks: {unknown}"
    resources: list[dict] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        resources += render(path) if path.is_dir() else _load_yaml_documents(path)
    for entry in spec.get("components", []):
        component = directory / entry
        component_spec = yaml.safe_load((component / "kustomization.yaml").read_text())
        assert component_spec["kind"] == "Component", f"{component}: not a Component"
        assert set(component_spec) <= {"apiVersion", "kind", "patches"}, component
        _apply_patches(component, component_spec, resources)
    _apply_patches(directory, spec, resources)
    return resources


# ---------------------------------------------------------------- facts from the image

def dockerfile_facts(dockerfile: Path) -> dict:
    text = dockerfile.read_text()
    runtime = re.split(r"^FROM ", text, flags=re.M)[-1]
    user = re.search(r"^USER (\S+)", runtime, flags=re.M).group(1)
    uid = re.search(rf"useradd [^\n]*--uid (\d+)[^\n]* {re.escape(user)}\b", runtime)
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", runtime, flags=re.M).group(1))
    return {
        "uid": int(uid.group(1)),
        "exposed": {int(port) for line in re.findall(r"^EXPOSE (.+)$", runtime, flags=re.M)
                    for port in re.findall(r"(\d+)", line)},
        "entrypoint": json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", runtime,
                                           flags=re.M).group(1)),
        "store_dir": cmd[cmd.index("--store-dir") + 1],
    }


def exported_metrics() -> set[str]:
    """The metric names a server's /metrics page declares (`# TYPE name kind`)."""
    from prometheus_client import generate_latest

    page = generate_latest(ServerMetrics().registry).decode()
    return set(re.findall(r"^# TYPE (\S+) ", page, flags=re.M))


# ---------------------------------------------------------------- helpers

def quantity_bytes(value: str | int) -> float:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
             "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i|[kMGT])?", str(value))
    assert match, f"not a byte quantity: {value!r}"
    return float(match.group(1)) * units.get(match.group(2) or "", 1)


class _ParserError(Exception):
    pass


class _StrictParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _ParserError(message)


def serve_parser() -> argparse.ArgumentParser:
    parser = _StrictParser(prog="gradprobe serve")
    add_serve_arguments(parser)
    return parser


def healthcheck_parser() -> argparse.ArgumentParser:
    parser = healthcheck.build_parser()
    parser.error = _StrictParser.error.__get__(parser)  # type: ignore[method-assign]
    return parser


def one(resources: list[dict], kind: str, name: str | None = None) -> dict:
    found = [r for r in resources
             if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def gradprobe_container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    # the components patch containers/0
    assert containers[0]["name"] == "gradprobe", "containers/0 must be the gradprobe container"
    return containers[0]


def serve_args(container: dict) -> argparse.Namespace:
    """The container's args as `gradprobe serve` parses them."""
    args = container["args"]
    assert not any("$(" in arg for arg in args), "this check does not expand $(VAR) yet"
    assert args[0] == "serve", f"args must start with the serve command, got {args[0]!r}"
    try:
        parsed = serve_parser().parse_args(args[1:])
    except _ParserError as exc:
        raise AssertionError(f"gradprobe serve refuses the container's args: {exc}") from None
    try:  # the server's own range checks; the token file exists only in the pod
        config_from_args(argparse.Namespace(**{**vars(parsed), "token_file": None}))
    except ConfigError as exc:
        raise AssertionError(f"gradprobe serve refuses the container's args: {exc}") from None
    return parsed


def volume_at(pod: dict, container: dict, path: str) -> tuple[dict, dict]:
    """The mount whose mountPath is `path` exactly, and its volume."""
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    assert mounts, f"nothing is mounted at {path}"
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
    return mounts[0], volume


def secret_file(pod: dict, container: dict, path: Path) -> tuple[str, str]:
    """(Secret name, key) that the file `path` comes from; fails if no Secret volume has it."""
    mount, volume = volume_at(pod, container, str(path.parent))
    assert "secret" in volume, f"{path.parent} is not a Secret volume"
    assert mount.get("readOnly"), f"the Secret at {path.parent} must be mounted readOnly"
    items = volume["secret"].get("items")
    key = next((i["key"] for i in items if i["path"] == path.name), None) if items \
        else path.name
    assert key, f"Secret {volume['secret']['secretName']} has no item at {path.name}"
    return volume["secret"]["secretName"], key


def probes(container: dict) -> dict[str, dict]:
    return {name: container[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")
            if name in container}


def container_port(container: dict, name_or_number: str | int) -> int:
    for port in container["ports"]:
        if name_or_number in (port.get("name"), port["containerPort"]):
            return port["containerPort"]
    raise AssertionError(f"the container has no port {name_or_number!r}")


# ---------------------------------------------------------------- the checks

@functools.cache
def _schema_error(resource_json: str, version: str) -> str | None:
    """Each validation reads megabytes of schema: the broken copies below re-ask the same
    unchanged resources many times."""
    try:
        kubernetes_validate.validate(json.loads(resource_json), version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{'.'.join(str(p) for p in exc.path)}: {exc.message}"
    return None


def check_schemas(resources: list[dict]) -> None:
    for resource in resources:
        for version in KUBERNETES_VERSIONS:
            # SchemaNotFoundError propagates: every resource here must have a schema
            error = _schema_error(json.dumps(resource, sort_keys=True), version)
            assert error is None, f"{resource['kind']}/{resource['metadata']['name']} is " \
                                  f"invalid on Kubernetes {version}: {error}"


def check_image(resources: list[dict], image: dict) -> None:
    deployment = one(resources, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = gradprobe_container(deployment)
    assert "command" not in container, "keep the image's ENTRYPOINT (gradprobe)"
    assert image["entrypoint"] == ["gradprobe"]
    args = serve_args(container)
    assert str(args.store_dir) == image["store_dir"], \
        f"--store-dir {args.store_dir}, the image's store is {image['store_dir']}"
    ports = {p["containerPort"] for p in container["ports"]}
    assert ports <= image["exposed"], f"ports {ports - image['exposed']} not EXPOSEd"
    for context in (pod["securityContext"], container["securityContext"]):
        assert context.get("runAsUser", image["uid"]) == image["uid"], \
            f"runAsUser {context['runAsUser']}, the image's user is {image['uid']}"


def check_security(resources: list[dict]) -> None:
    deployment = one(resources, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = gradprobe_container(deployment)
    pod_context, context = pod["securityContext"], container["securityContext"]
    assert pod_context.get("runAsNonRoot") and context.get("runAsNonRoot") is not False
    assert context.get("runAsUser", pod_context.get("runAsUser")) not in (None, 0)
    assert context.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem must be true"
    assert context.get("allowPrivilegeEscalation") is False, \
        "allowPrivilegeEscalation must be false"
    assert context.get("capabilities", {}).get("drop") == ["ALL"], "drop ALL capabilities"
    assert not context.get("capabilities", {}).get("add"), "no capability may be added"
    assert not context.get("privileged")
    seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
    assert seccomp.get("type") == "RuntimeDefault", "seccompProfile must be RuntimeDefault"
    assert pod.get("automountServiceAccountToken") is False
    # the volume types the Pod Security Standard "restricted" allows, less the ones unused here
    kinds = {key for volume in pod["volumes"] for key in volume if key != "name"}
    assert kinds <= {"emptyDir", "secret", "configMap", "projected", "downwardAPI"}, \
        f"volume types outside the restricted profile: {kinds}"


def check_ports_and_probes(resources: list[dict]) -> None:
    deployment = one(resources, "Deployment")
    container = gradprobe_container(deployment)
    args = serve_args(container)
    assert container_port(container, "grpc") == args.port, \
        f"port grpc is {container_port(container, 'grpc')}, --port is {args.port}"
    assert args.metrics_port, "pass --metrics-port (Prometheus scrapes it)"
    assert container_port(container, "metrics") == args.metrics_port, \
        f"port metrics is {container_port(container, 'metrics')}, " \
        f"--metrics-port is {args.metrics_port}"
    assert set(probes(container)) == {"startupProbe", "readinessProbe", "livenessProbe"}
    for name, probe in probes(container).items():
        if "grpc" in probe:
            assert args.tls_cert is None, \
                f"{name}: the kubelet's gRPC probe speaks plaintext, the server TLS"
            assert probe["grpc"]["port"] == args.port, \
                f"{name} asks port {probe['grpc']['port']}, --port is {args.port}"
            service = probe["grpc"].get("service", "")
        else:
            command = probe["exec"]["command"]
            assert command[:3] == ["python", "-m", "gradprobe.server.healthcheck"], command
            assert importlib.util.find_spec(command[2]) is not None
            try:
                check = healthcheck_parser().parse_args(command[3:])
            except _ParserError as exc:
                raise AssertionError(f"{name}: the health check refuses {command}: {exc}") \
                    from None
            assert check.address.rsplit(":", 1)[1] == str(args.port), \
                f"{name} asks {check.address}, --port is {args.port}"
            assert (check.tls_ca is None) == (args.tls_cert is None), \
                f"{name}: TLS on one side only"
            if check.tls_ca is not None:
                assert check.tls_ca.parent == args.tls_cert.parent, \
                    f"{name}: --tls-ca {check.tls_ca} is not beside --tls-cert"
                assert probe["timeoutSeconds"] > check.timeout, \
                    f"{name}: timeoutSeconds must exceed the check's own --timeout"
            service = check.service
        # readiness follows the gradprobe service, which goes NOT_SERVING on SIGTERM
        wanted = "gradprobe.v1.Gradprobe" if name == "readinessProbe" else ""
        assert service == wanted, f"{name} asks service {service!r}, not {wanted!r}"
    # torch import + warm-up: the startup probe must allow minutes, not seconds
    startup = container["startupProbe"]
    allowed = startup["periodSeconds"] * startup["failureThreshold"]
    assert allowed >= 120, f"the startup probe allows only {allowed} s to import torch"


def check_shutdown(resources: list[dict]) -> None:
    deployment = one(resources, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = gradprobe_container(deployment)
    args = serve_args(container)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > pre_stop + args.grace_s, \
        f"terminationGracePeriodSeconds {grace} must exceed the preStop sleep ({pre_stop} s)" \
        f" + --grace-s ({args.grace_s:g} s)"
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0, "a rollout must not drop serving capacity"


def check_storage_and_resources(resources: list[dict]) -> None:
    deployment = one(resources, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = gradprobe_container(deployment)
    args = serve_args(container)
    _, store = volume_at(pod, container, str(args.store_dir))
    assert "emptyDir" in store, f"the store at {args.store_dir} must be an emptyDir"
    assert args.store_max_gb, "set --store-max-gb: the emptyDir has a size limit"
    quota, size = args.store_max_gb * GIB, quantity_bytes(store["emptyDir"]["sizeLimit"])
    # over the limit the kubelet evicts the pod: the quota (LRU) must act first
    assert quota < size <= 2 * quota, \
        f"store sizeLimit {store['emptyDir']['sizeLimit']} must lie just above " \
        f"--store-max-gb {args.store_max_gb:g} (GiB)"
    env = {item["name"]: item.get("value") for item in container.get("env", [])}
    _, tmp = volume_at(pod, container, env.get("TMPDIR", "/tmp"))
    assert "emptyDir" in tmp, "worker scratch (TMPDIR) must be a writable emptyDir"
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert {"cpu", "memory"} <= set(requests), "request cpu and memory (the HPA needs cpu)"
    # workers size their torch thread pools from os.cpu_count(), the node's cores
    assert "cpu" not in limits, "no CPU limit: a CFS quota would throttle the workers' threads"
    assert args.worker_memory_mb, "set --worker-memory-mb: its default reads the node's memory"
    needed = (args.workers * args.worker_memory_mb + SERVER_OVERHEAD_MIB) << 20
    assert quantity_bytes(limits["memory"]) >= needed, \
        f"memory limit {limits['memory']} < --workers {args.workers} x --worker-memory-mb " \
        f"{args.worker_memory_mb} + {SERVER_OVERHEAD_MIB} MiB"
    scratch = sum(quantity_bytes(v["emptyDir"].get("sizeLimit", 0)) for v in pod["volumes"]
                  if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory")
    assert quantity_bytes(limits["ephemeral-storage"]) >= scratch, \
        "ephemeral-storage limit below the emptyDirs' size limits"
    gpus = int(limits.get("nvidia.com/gpu", 0))
    assert (gpus > 0) == (args.device == "cuda"), \
        f"--device {args.device} with nvidia.com/gpu limit {gpus}"


def check_secrets(resources: list[dict]) -> None:
    deployment = one(resources, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = gradprobe_container(deployment)
    args = serve_args(container)
    assert args.token_file is not None, "require a token (--token-file from a Secret)"
    expected = {"token_file": ("gradprobe-token", "token")}
    assert (args.tls_cert is None) == (args.tls_key is None)
    if args.tls_cert is not None:
        expected.update(tls_cert=("gradprobe-tls", "tls.crt"), tls_key=("gradprobe-tls", "tls.key"))
    for flag, (secret, key) in expected.items():
        found = secret_file(pod, container, getattr(args, flag))
        assert found == (secret, key), f"--{flag.replace('_', '-')} reads Secret " \
                                       f"{found[0]} key {found[1]}, not {secret} key {key}"
    for volume in pod["volumes"]:
        if "secret" in volume:
            mode = volume["secret"].get("defaultMode", 0o644)
            assert not mode & 0o007, f"Secret {volume['name']} is world-readable"


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_services_and_scaling(resources: list[dict]) -> None:
    deployment = one(resources, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = gradprobe_container(deployment)
    args = serve_args(container)
    assert _selects(deployment["spec"]["selector"]["matchLabels"], labels)
    headless = one(resources, "Service", "gradprobe-headless")
    cluster_ip = one(resources, "Service", "gradprobe")
    assert headless["spec"]["clusterIP"] == "None", "gradprobe-headless must be headless"
    assert cluster_ip["spec"].get("clusterIP") != "None"
    for service in (headless, cluster_ip):
        assert _selects(service["spec"]["selector"], labels), \
            f"Service {service['metadata']['name']} selects no gradprobe pod"
        grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert container_port(container, grpc["targetPort"]) == args.port, \
            f"Service {service['metadata']['name']} sends grpc to a port that is not --port"
    pdb = one(resources, "PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels), "the PDB covers no pod"
    hpa = one(resources, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"]), \
        f"the HPA scales {target['kind']} {target['name']}"
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu"
               for m in hpa["spec"]["metrics"]), "scale on CPU first"
    # a drain must be possible at the smallest size without leaving zero replicas serving
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"], \
        "the PDB would let a drain take every replica at once"
    assert deployment["spec"]["replicas"] >= hpa["spec"]["minReplicas"]


def check_monitoring(resources: list[dict], monitor: dict, adapter: dict,
                     queue_hpa: dict | None) -> None:
    """The ServiceMonitor and the prometheus-adapter rule, whose CRDs have no schema here."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    container = gradprobe_container(one(resources, "Deployment"))
    args = serve_args(container)
    services = [s for s in resources if s["kind"] == "Service"
                and _selects(monitor["spec"]["selector"]["matchLabels"],
                             s["metadata"].get("labels", {}))]
    assert [s["metadata"]["name"] for s in services] == ["gradprobe-headless"], \
        "the ServiceMonitor must select the headless Service alone (one target per pod)"
    (endpoint,) = monitor["spec"]["endpoints"]
    port = next((p for p in services[0]["spec"]["ports"] if p["name"] == endpoint["port"]),
                None)
    assert port, f"the headless Service has no port {endpoint['port']!r}"
    assert container_port(container, port["targetPort"]) == args.metrics_port, \
        "the ServiceMonitor scrapes a port that is not --metrics-port"
    assert endpoint.get("path", "/metrics") == "/metrics"
    (rule,) = adapter["rules"]["custom"]
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    assert series == "gradprobe_queue_depth"
    assert series in exported_metrics(), f"the server exports no {series}"
    assert re.fullmatch(rule["name"]["matches"].strip("^$"), series)
    assert {"pod", "namespace"} <= set(rule["resources"]["overrides"]), \
        "a Pods metric needs the pod and namespace labels"
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]
    if queue_hpa is not None:
        names = [m["pods"]["metric"]["name"] for m in queue_hpa["spec"]["metrics"]
                 if m["type"] == "Pods"]
        assert names == [rule["name"]["as"]], \
            f"the HPA asks for {names}, the adapter serves {rule['name']['as']}"


def check_examples(deploy: Path) -> None:
    for relative in CORE_EXAMPLES:
        check_schemas(_load_yaml_documents(deploy / relative))
    for path in deploy.rglob("*.yaml"):
        for doc in _load_yaml_documents(path):
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                values = {**doc.get("data", {}), **doc.get("stringData", {})}
                assert not any(values.values()), f"{path}: never commit a real secret"
    (certificate,) = _load_yaml_documents(deploy / "examples/certificate.yaml")
    assert certificate["spec"]["secretName"] == "gradprobe-tls"
    tls = gradprobe_container(one(render(deploy / "overlays/tls"), "Deployment"))
    for probe in probes(tls).values():
        name = healthcheck_parser().parse_args(probe["exec"]["command"][3:]).tls_server_name
        assert name in certificate["spec"]["dnsNames"], \
            f"the TLS health check verifies {name!r}, the certificate example lacks it"


def check_readme(deploy: Path) -> None:
    """The deployment guide's commands name what exists."""
    readme = (deploy / "README.md").read_text()
    applied = re.findall(r"kubectl apply [^\n]*-k deploy/kubernetes/(\S+)", readme)
    assert applied and set(applied) <= set(KUSTOMIZATIONS), \
        f"the README applies {set(applied) - set(KUSTOMIZATIONS)}, not a checked kustomization"
    base = render(deploy / "base")
    targets = re.findall(r"--server dns:///([\w-]+)\.NS\.svc\.cluster\.local:(\d+)", readme)
    assert targets, "the README shows no dns:/// target"
    for name, port in targets:
        service = one(base, "Service", name)
        assert service["spec"].get("clusterIP") == "None", f"dns:///{name}: not headless"
        ports = {p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"}
        assert int(port) in ports, f"dns:///{name}:{port}: the Service's grpc port is {ports}"
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)]
    adapter = _load_yaml_documents(deploy / "monitoring/prometheus-adapter-values.yaml")[0]
    assert adapter in blocks, "the README's adapter rule differs from monitoring/"
    unknown = set(re.findall(r"\bgradprobe_\w+", readme)) - exported_metrics()
    assert not unknown, f"the server exports no {sorted(unknown)}"


def check_against_reality(resources: list[dict], image) -> None:  # noqa: ANN001
    """Everything a rendered variant must agree on with the image and the server."""
    check_image(resources, image)
    check_security(resources)
    check_ports_and_probes(resources)
    check_shutdown(resources)
    check_storage_and_resources(resources)
    check_secrets(resources)
    check_services_and_scaling(resources)


def check_all(deploy: Path, dockerfile: Path) -> None:
    image = dockerfile_facts(dockerfile)
    monitor = _load_yaml_documents(deploy / "monitoring/servicemonitor.yaml")[0]
    adapter = _load_yaml_documents(deploy / "monitoring/prometheus-adapter-values.yaml")[0]
    for kustomization in KUSTOMIZATIONS:
        resources = render(deploy / kustomization)
        check_schemas(resources)
        check_against_reality(resources, image)
        hpa = one(resources, "HorizontalPodAutoscaler")
        queue = hpa if any(m["type"] == "Pods" for m in hpa["spec"]["metrics"]) else None
        check_monitoring(resources, monitor, adapter, queue)
    check_examples(deploy)
    check_readme(deploy)


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifests_validate_against_the_pinned_kubernetes_schemas(kustomization):
    resources = render(DEPLOY / kustomization)
    assert {r["kind"] for r in resources} == {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    check_schemas(resources)


def test_examples_and_custom_resources_are_checked():
    for relative in CUSTOM_RESOURCES:  # no schema: strict validation would not know them
        (doc,) = _load_yaml_documents(DEPLOY / relative)
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
    check_examples(DEPLOY)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifests_match_the_image_and_the_server(kustomization):
    check_against_reality(render(DEPLOY / kustomization), dockerfile_facts(ROOT / "Dockerfile"))


def test_variants_differ_where_they_should():
    base, gpu, tls = (serve_args(gradprobe_container(one(render(DEPLOY / k), "Deployment")))
                      for k in KUSTOMIZATIONS)
    assert (base.device, gpu.device, tls.device) == ("auto", "cuda", "auto")
    assert base.tls_cert is None and gpu.tls_cert is None and tls.tls_cert is not None
    gpu_hpa = one(render(DEPLOY / "overlays/gpu"), "HorizontalPodAutoscaler")
    assert [m["type"] for m in gpu_hpa["spec"]["metrics"]] == ["Resource", "Pods"]


def test_the_deployment_guide_names_what_exists():
    check_readme(DEPLOY)


def test_monitoring_matches_the_deployment():
    monitor = _load_yaml_documents(DEPLOY / "monitoring/servicemonitor.yaml")[0]
    adapter = _load_yaml_documents(DEPLOY / "monitoring/prometheus-adapter-values.yaml")[0]
    gpu = render(DEPLOY / "overlays/gpu")
    check_monitoring(gpu, monitor, adapter, one(gpu, "HorizontalPodAutoscaler"))


def _documents_by_name(text: str) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(text) if d}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_this_reader_renders_what_kustomize_renders(kustomization):
    done = subprocess.run(["kubectl", "kustomize", str(DEPLOY / kustomization)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ours = {(r["kind"], r["metadata"]["name"]): r for r in render(DEPLOY / kustomization)}
    assert _documents_by_name(done.stdout) == ours


# ---------------------------------------------------------------- each check can fail

BREAKAGES = [
    # (file under deploy/kubernetes, text, replacement, what the failure says)
    ("base/deployment.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesytem: true",
     "invalid on Kubernetes"),
    ("base/pdb.yaml", "maxUnavailable: 1", "maxUnavailable: [1]", "invalid on Kubernetes"),
    ("base/deployment.yaml", "- --max-queue\n", "- --max-queues\n",
     "refuses the container's args"),
    ("base/deployment.yaml", '- --workers\n            - "2"', '- --workers\n            - two',
     "refuses the container's args"),
    ("base/deployment.yaml", "runAsUser: 10001\n        runAsGroup",
     "runAsUser: 10002\n        runAsGroup", "the image's user is 10001"),
    ("base/deployment.yaml", "- /var/lib/gradprobe/store\n", "- /var/lib/gradprobe/models\n",
     "the image's store is"),
    ("base/deployment.yaml", "mountPath: /var/lib/gradprobe/store",
     "mountPath: /var/lib/gradprobe", "nothing is mounted at /var/lib/gradprobe/store"),
    ("base/deployment.yaml", '- --port\n            - "50051"', '- --port\n            - "50052"',
     "port grpc is 50051, --port is 50052"),
    ("base/deployment.yaml", "containerPort: 9090", "containerPort: 9091", "not EXPOSEd"),
    ("base/deployment.yaml", "grpc:\n              port: 50051\n            periodSeconds: 20",
     "grpc:\n              port: 50052\n            periodSeconds: 20",
     "livenessProbe asks port 50052, --port is 50051"),
    ("base/deployment.yaml", "- --metrics-port\n            - \"9090\"",
     "- --metrics-port\n            - \"9191\"", "--metrics-port is 9191"),
    ("base/deployment.yaml", "terminationGracePeriodSeconds: 60",
     "terminationGracePeriodSeconds: 35", "must exceed the preStop sleep"),
    ("base/deployment.yaml", "sizeLimit: 10Gi", "sizeLimit: 6Gi", "must lie just above"),
    ("base/deployment.yaml", "mountPath: /tmp", "mountPath: /scratch",
     "nothing is mounted at /tmp"),
    ("base/deployment.yaml", "- /etc/gradprobe/token/token", "- /etc/gradprobe/token.txt",
     "nothing is mounted at /etc/gradprobe"),
    ("base/deployment.yaml", "path: token\n", "path: bearer\n", "has no item at token"),
    ("base/deployment.yaml", "memory: 6Gi\n              ephemeral-storage: 13Gi",
     "memory: 4Gi\n              ephemeral-storage: 13Gi", "memory limit 4Gi"),
    ("base/deployment.yaml", "limits:\n              memory: 6Gi",
     "limits:\n              cpu: \"4\"\n              memory: 6Gi", "no CPU limit"),
    ("base/deployment.yaml", "\n            - --worker-memory-mb\n            - \"2048\"", "",
     "set --worker-memory-mb"),
    ("base/deployment.yaml", "allowPrivilegeEscalation: false",
     "allowPrivilegeEscalation: true", "allowPrivilegeEscalation must be false"),
    ("base/deployment.yaml", "drop:\n                - ALL", "drop:\n                - NET_RAW",
     "drop ALL"),
    ("base/deployment.yaml", "type: RuntimeDefault\n          volumeMounts",
     "type: Unconfined\n          volumeMounts", "RuntimeDefault"),
    ("base/deployment.yaml", "defaultMode: 0440", "defaultMode: 0444", "world-readable"),
    ("base/deployment.yaml", "failureThreshold: 36", "failureThreshold: 6",
     "the startup probe allows only 30 s"),
    ("base/deployment.yaml", "              service: gradprobe.v1.Gradprobe\n", "",
     "readinessProbe asks service ''"),
    ("base/service-headless.yaml", "clusterIP: None", "clusterIP: 10.0.0.10", "headless"),
    ("base/service.yaml", "targetPort: grpc", "targetPort: metrics", "not --port"),
    ("base/pdb.yaml", "matchLabels:\n      app.kubernetes.io/name: gradprobe",
     "matchLabels:\n      app.kubernetes.io/name: other",
     "the PDB covers no pod"),
    ("base/hpa.yaml", "name: gradprobe\n  minReplicas", "name: gradprobe-x\n  minReplicas",
     "the HPA scales Deployment gradprobe-x"),
    ("base/hpa.yaml", "minReplicas: 2", "minReplicas: 1", "take every replica at once"),
    ("components/gpu/deployment-gpu.yaml", "value: cuda", "value: cpu", "--device cpu with"),
    ("components/gpu/deployment-gpu.yaml", "nvidia.com~1gpu", "amd.com~1gpu", "--device cuda"),
    ("components/tls/deployment-tls.yaml", "value: /etc/gradprobe/tls/tls.key",
     "value: /etc/gradprobe/tls/key.pem", "--tls-key reads Secret gradprobe-tls key key.pem"),
    ("components/tls/deployment-tls.yaml", '--timeout, "5"]\n    periodSeconds: 20',
     '--timeouts, "5"]\n    periodSeconds: 20', "the health check refuses"),
    ("components/tls/deployment-tls.yaml", '"127.0.0.1:50051",\n                --tls-ca, '
     '/etc/gradprobe/tls/ca.crt, --tls-server-name, gradprobe,\n                --timeout, "5"]'
     '\n    periodSeconds: 20', '"127.0.0.1:50052",\n                --tls-ca, '
     '/etc/gradprobe/tls/ca.crt, --tls-server-name, gradprobe,\n                --timeout, "5"]'
     '\n    periodSeconds: 20', "--port is 50051"),
    ("components/tls/deployment-tls.yaml", "periodSeconds: 20\n    timeoutSeconds: 10",
     "periodSeconds: 20\n    timeoutSeconds: 5", "must exceed the check's own --timeout"),
    ("components/queue-autoscaling/hpa-queue-depth.yaml", "name: gradprobe_queue_depth",
     "name: gradprobe_queue", "the adapter serves gradprobe_queue_depth"),
    ("monitoring/servicemonitor.yaml", "- port: metrics", "- port: grpc", "not --metrics-port"),
    ("monitoring/servicemonitor.yaml", "      app.kubernetes.io/component: headless\n", "",
     "headless Service alone"),
    ("README.md", "dns:///gradprobe-headless.NS", "dns:///gradprobe-headles.NS",
     "expected one Service gradprobe-headles,"),
    ("README.md", "svc.cluster.local:50051 \\", "svc.cluster.local:5051 \\",
     "the Service's grpc port is {50051}"),
    ("README.md", "kubectl apply -n gradprobe -k deploy/kubernetes/overlays/gpu",
     "kubectl apply -n gradprobe -k deploy/kubernetes/overlay/gpu", "not a checked kustomization"),
    ("README.md", "max_over_time(<<.Series>>{<<.LabelMatchers>>}[1m]))'\n```",
     "avg_over_time(<<.Series>>{<<.LabelMatchers>>}[1m]))'\n```", "the README's adapter rule"),
    ("base/deployment.yaml", "- name: tmp\n          emptyDir:\n            sizeLimit: 2Gi",
     "- name: tmp\n          hostPath:\n            path: /tmp",
     "volume types outside the restricted profile"),
    ("README.md", "`gradprobe_store_evictions_total`", "`gradprobe_store_evicted_total`",
     "the server exports no ['gradprobe_store_evicted_total']"),
    ("examples/token-secret.yaml", 'token: ""', 'token: "s3cret"', "never commit a real secret"),
    ("examples/certificate.yaml", "    - gradprobe\n", "", "the certificate example lacks it"),
]


@pytest.mark.parametrize("relative, text, replacement, message", BREAKAGES,
                         ids=[f"{b[0].split('/')[-1]}:{b[3][:30]}" for b in BREAKAGES])
def test_a_broken_copy_fails_the_checks(tmp_path, relative, text, replacement, message):
    deploy = tmp_path / "kubernetes"
    shutil.copytree(DEPLOY, deploy)
    target = deploy / relative
    assert target.read_text().count(text) == 1, f"{relative}: {text!r} not found once"
    target.write_text(target.read_text().replace(text, replacement))
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_all(deploy, ROOT / "Dockerfile")


def test_the_intact_manifests_pass_every_check():
    check_all(DEPLOY, ROOT / "Dockerfile")


@pytest.mark.parametrize("text, replacement, message", [
    ("EXPOSE 9090\n", "EXPOSE 9191\n", "not EXPOSEd"),
    ("--uid 10001", "--uid 10002", "the image's user is 10002"),
    ('"--store-dir", "/var/lib/gradprobe/store"', '"--store-dir", "/data/store"',
     "the image's store is /data/store"),
])
def test_a_different_image_fails_the_checks(tmp_path, text, replacement, message):
    dockerfile = tmp_path / "Dockerfile"
    original = (ROOT / "Dockerfile").read_text()
    assert original.count(text) == 1, f"Dockerfile: {text!r} not found once"
    dockerfile.write_text(original.replace(text, replacement))
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_all(DEPLOY, dockerfile)


def test_quantities_read_as_kubernetes_reads_them():
    assert quantity_bytes("10Gi") == 10 * GIB and quantity_bytes("500M") == 5e8
    assert quantity_bytes(1024) == 1024
    with pytest.raises(AssertionError):
        quantity_bytes("10GB")
