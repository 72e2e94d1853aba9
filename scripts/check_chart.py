#!/usr/bin/env python3
"""Checks the Helm chart and the plain manifests; exits non-zero on any failure.

- `helm lint` (Helm's own linter, from the PyPI package helm-python-sdk) with every scenario's values;
- renders the chart by Helm's engine with the default values and with each scenario below, and
  validates every rendered object against the Kubernetes API schemas (kubernetes-validate,
  strict: unknown fields fail) of the oldest supported and the newest known Kubernetes;
  the ServiceMonitor (a Prometheus operator CRD) against a schema of its own here;
- lints all YAML with yamllint (.yamllint): values.yaml, Chart.yaml, the CRD, manifests/, and
  every rendered template (templates themselves are Go templates, not YAML);
- manifests/ drift: re-renders into a temporary directory and compares (fix: scripts/generate.sh);
- scripts/chart_semantics.py: the semantics issue 6 asks for (CSIDriver fields, Bidirectional propagation, privileged node
  plugin, /dev/fuse, tolerations, provisioner flags, replicas, StorageClasses, ConfigMap keys,
  IRSA and Secret credentials, RBAC verbs each justified by a comment);
- cross-checks with the Rust sources: driver name, FSx parameter keys, the kubectl plugin's
  ConfigMap name and keys, and that every flag and env variable the chart passes exists.

    pip install -r scripts/requirements.txt && python3 scripts/check_chart.py
"""

from __future__ import annotations

import functools
import importlib
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, str(Path(__file__).resolve().parent))

PACKAGES = {  # module -> PyPI package (pinned in scripts/requirements.txt)
    "helm_python": "helm-python-sdk",
    "kubernetes_validate": "kubernetes-validate",
    "yamllint": "yamllint",
    "yaml": "PyYAML",
    "jsonschema": "jsonschema",
}
missing = []
for module, package in PACKAGES.items():
    try:
        importlib.import_module(module)
    except ImportError:
        missing.append(package)
if missing:
    print(
        f"error: missing Python packages: {', '.join(missing)}. "
        "Run `pip install -r scripts/requirements.txt`.",
        file=sys.stderr,
    )
    sys.exit(2)

import helm_python  # noqa: E402
import jsonschema  # noqa: E402
import kubernetes_validate  # noqa: E402
import kubernetes_validate.utils  # noqa: E402
import yaml  # noqa: E402
from yamllint import linter  # noqa: E402
from yamllint.config import YamlLintConfig  # noqa: E402

import render_manifests  # noqa: E402
from chart_semantics import (  # noqa: E402
    Rendered,
    check_configmap,
    check_controller,
    check_credentials,
    check_csidriver,
    check_flags_exist,
    check_images,
    check_node,
    check_rbac,
    check_service_monitor,
    check_storageclasses,
    check_values_documented,
    clean,
    fail,
    split_values,
)

CHART = ROOT / "charts" / "datastore-csi"
MANIFESTS = ROOT / "manifests"
CRDS = sorted((CHART / "crds").glob("*.yaml"))
# csi-provisioner v6 (the default sidecar) needs Kubernetes 1.34; also check the newest known.
KUBE_VERSIONS = ["1.34.0", kubernetes_validate.latest_version()]

# Schemas are re-read for every object otherwise (seconds over all scenarios).
kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(
    kubernetes_validate.utils.schema_contents
)

SCENARIOS: dict[str, dict] = {
    "defaults": {},
    "fsx+irsa": {
        "store": {"bucket": "acme-datastores", "prefix": "/prod/", "region": "us-east-1"},
        "irsa": {"roleArn": "arn:aws:iam::123456789012:role/datastore-csi"},
        "fsx": {
            "enabled": True,
            "clusterName": "ml-prod",
            "deploymentType": "PERSISTENT_2",
            "perUnitStorageThroughput": 250,
            "subnetId": "subnet-0123456789abcdef0",
            "securityGroupIds": ["sg-1111", "sg-2222"],
            "dataCompressionType": "LZ4",
            "kmsKeyId": "arn:aws:kms:us-east-1:123456789012:key/abc",
            "extraTags": {"team": "ml", "env": "prod"},
            "mountProgram": "/opt/lustre/sbin/mount",
        },
        "controller": {
            "sources": {
                "allowed": [
                    {"namespace": "*", "location": "s3://datasets/teams/{namespace}/"},
                    {"namespace": "ml", "location": "s3://public-imagenet/"},
                ]
            }
        },
    },
    "secret+minio+servicemonitor": {
        "store": {"url": "s3://data/team-a", "endpoint": "http://minio.minio.svc:9000"},
        "credentials": {
            "secret": {"name": "datastore-aws", "create": True, "accessKeyId": "AKIAEXAMPLE", "secretAccessKey": "example"}
        },
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "node": {"hostNetwork": True, "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}},
    },
    "existing-secret, no operator, one replica": {
        "_release": ("ds", "storage"),
        "store": {"bucket": "b"},
        "credentials": {"secret": {"name": "existing-aws-keys"}},
        "controller": {"replicas": 1, "operatorEnabled": False},
        "storageClass": {"create": False},
        "metrics": {"enabled": False},
    },
}

# Value combinations the chart must refuse, and a word of the error it must give.
BAD_VALUES = {
    "IRSA and a Secret": ({"irsa": {"roleArn": "arn:x"}, "credentials": {"secret": {"name": "s"}}}, "not both"),
    "FSx without a cluster name": ({"fsx": {"enabled": True, "subnetId": "subnet-1"}}, "clusterName"),
    "FSx without a subnet": ({"fsx": {"enabled": True, "clusterName": "c"}}, "subnetId"),
    "Secret to create without keys": ({"credentials": {"secret": {"name": "s", "create": True}}}, "accessKeyId"),
    "no store": ({"store": {"bucket": ""}}, "store.bucket"),
}

SERVICEMONITOR_SCHEMA = {  # the fields of monitoring.coreos.com/v1 ServiceMonitor we use
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                    "additionalProperties": False,
                },
                "namespaceSelector": {
                    "type": "object",
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                    "additionalProperties": False,
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                        },
                    },
                },
            },
        },
    },
}


# ---------------------------------------------------------------------------------------------
# Small check runner

class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []

    def run(self, name: str, fn, *args) -> None:
        try:
            fn(*args)
        except AssertionError as e:
            self.failed.append(name)
            print(f"FAIL {name}: {e}")
            return
        except Exception as e:  # a crash in a check is a failure of that check, with its trace
            self.failed.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            traceback.print_exc()
            return
        self.passed += 1
        print(f"ok   {name}")


# ---------------------------------------------------------------------------------------------
# Checks: Helm lint, schemas, yamllint

def check_lint(values: dict) -> None:
    values, _, namespace = split_values(values)
    report = helm_python.lint(str(CHART), values, namespace=namespace)
    problems = [f"{m['path']}: {m['error']}" for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    problems += report.get("errors") or []
    if problems:
        fail("helm lint: " + "; ".join(problems))


def check_schemas(r: Rendered) -> None:
    errors = []
    for obj in r.objects:
        what = f"{obj['__file']}: {obj['kind']}/{obj['metadata'].get('name')}"
        if obj["kind"] == "ServiceMonitor":
            try:
                jsonschema.validate(clean(obj), SERVICEMONITOR_SCHEMA)
            except jsonschema.ValidationError as e:
                errors.append(f"{what}: {e.message}")
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(clean(obj), version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                errors.append(f"{what} (Kubernetes {version}): {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(f"{what}: no schema for {obj['apiVersion']} {obj['kind']} in Kubernetes {version}")
    if errors:
        fail("\n  " + "\n  ".join(errors))


def check_crd_schema() -> None:
    for path in CRDS:
        crd = yaml.safe_load(path.read_text())
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(crd, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{path.name} (Kubernetes {version}): {'.'.join(str(p) for p in e.path)}: {e.message}")


@functools.lru_cache(maxsize=None)
def yamllint_config() -> YamlLintConfig:
    return YamlLintConfig(file=str(ROOT / ".yamllint"))


def lint_yaml(text: str, what: str) -> list[str]:
    return [f"{what}:{p.line}:{p.column}: [{p.level}] {p.desc} ({p.rule})" for p in linter.run(text, yamllint_config())]


def check_yamllint_files() -> None:
    files = [CHART / "values.yaml", CHART / "Chart.yaml", *CRDS, ROOT / ".yamllint", *sorted(MANIFESTS.glob("*.yaml"))]
    problems = []
    for f in files:
        problems += lint_yaml(f.read_text(), str(f.relative_to(ROOT)))
    if problems:
        fail("\n  " + "\n  ".join(problems))


def check_yamllint_rendered(r: Rendered) -> None:
    problems = []
    for name, text in sorted(r.texts.items()):
        problems += lint_yaml(text, f"rendered {name}")
    if problems:
        fail("\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------
# Checks: manifests/

def check_drift() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        render_manifests.write(Path(tmp))
        want = {p.name: p.read_text() for p in Path(tmp).glob("*.yaml")}
    have = {p.name: p.read_text() for p in MANIFESTS.glob("*.yaml") if p.name not in render_manifests.CRD_FILES}
    differ = sorted(n for n in want if have.get(n) != want[n])
    extra = sorted(set(have) - set(want))
    problems = [f"{n} differs" if n in have else f"{n} is missing" for n in differ]
    problems += [f"{n} is not generated (stale)" for n in extra]
    for name, source in render_manifests.CRD_FILES.items():
        crd, chart_crd = MANIFESTS / name, CHART / "crds" / source
        if not crd.exists() or crd.read_text() != chart_crd.read_text():
            problems.append(f"{name} differs from {chart_crd.relative_to(ROOT)}")
    if problems:
        fail("manifests/ is out of date (" + "; ".join(problems) + "): run scripts/generate.sh")


def check_kustomize() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print("     (kubectl not installed: `kubectl kustomize manifests/` not tried)")
        return
    out = subprocess.run([kubectl, "kustomize", str(MANIFESTS)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        fail(f"kubectl kustomize manifests/ failed: {out.stderr.strip()}")
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(out.stdout) if d)
    want = sorted(
        [o["kind"] for o in Rendered({}).objects] + ["Namespace"] + ["CustomResourceDefinition"] * len(render_manifests.CRD_FILES)
    )
    if kinds != want:
        fail(f"kustomize builds {kinds}, expected {want}")


def check_bad_values(values: dict, word: str) -> None:
    values, name, namespace = split_values(values)
    with helm_python.Chart.load(str(CHART)) as chart:
        try:
            chart.render(values=values, name=name, namespace=namespace)
        except helm_python.HelmError as e:
            assert word in str(e), f"refused, but the message does not name {word!r}: {e}"
            return
    fail("rendered although the values cannot work")


def main() -> int:
    report = Report()
    report.run("values.yaml: every value documented", check_values_documented)
    rendered: dict[str, Rendered] = {}
    for scenario, values in SCENARIOS.items():
        report.run(f"[{scenario}] helm lint", check_lint, values)
        try:
            rendered[scenario] = Rendered(values)
        except Exception as e:
            report.failed.append(f"[{scenario}] render")
            print(f"FAIL [{scenario}] render: {e}")
            continue
        r = rendered[scenario]
        report.run(f"[{scenario}] Kubernetes schemas {' and '.join(KUBE_VERSIONS)} (strict)", check_schemas, r)
        report.run(f"[{scenario}] yamllint of the rendered templates", check_yamllint_rendered, r)
        for name, fn in [
            ("CSIDriver", check_csidriver),
            ("controller Deployment", check_controller),
            ("node DaemonSet", check_node),
            ("StorageClasses", check_storageclasses),
            ("ConfigMap", check_configmap),
            ("credentials (IRSA / Secret)", check_credentials),
            ("ServiceMonitor", check_service_monitor),
            ("RBAC", check_rbac),
            ("image tags", check_images),
            ("flags and env exist in src/", check_flags_exist),
        ]:
            report.run(f"[{scenario}] {name}", fn, r)
    for what, (values, word) in BAD_VALUES.items():
        report.run(f"refuses {what}", check_bad_values, values, word)
    report.run("CRD schema", check_crd_schema)
    report.run("yamllint: values.yaml, Chart.yaml, CRD, manifests/", check_yamllint_files)
    report.run("manifests/ up to date", check_drift)
    report.run("kubectl kustomize manifests/", check_kustomize)
    print(f"check_chart: {report.passed} checks passed, {len(report.failed)} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
