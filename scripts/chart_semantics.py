"""The chart's semantics, checked on rendered objects (used by scripts/check_chart.py).

What issue 6 asks of the install (CSIDriver fields, Bidirectional propagation, privileged node
plugin, /dev/fuse, tolerations, provisioner flags, replicas, StorageClasses, ConfigMap keys, IRSA
and Secret credentials, RBAC verbs each justified by a comment), and cross-checks with the Rust
sources: driver name, FSx parameter keys, the kubectl plugin's ConfigMap, and that every
subcommand, flag and env variable the chart hands the binary exists. Each check raises
AssertionError saying what is wrong.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import yaml

import render_manifests

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "datastore-csi"


def fail(msg: str) -> None:
    raise AssertionError(msg)


# ---------------------------------------------------------------------------------------------
# Rendering helpers

def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def split_values(values: dict) -> tuple[dict, str, str]:
    values = dict(values)
    name, namespace = values.pop("_release", (render_manifests.RELEASE, render_manifests.NAMESPACE))
    return values, name, namespace


@functools.lru_cache(maxsize=None)
def chart_defaults() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


class Rendered:
    """One scenario's rendered templates and objects."""

    def __init__(self, values: dict) -> None:
        values, self.release, self.namespace = split_values(values)
        self.values = deep_merge(chart_defaults(), values)
        self.texts = render_manifests.render_chart(values, self.release, self.namespace)
        self.objects: list[dict] = []
        for name, text in sorted(self.texts.items()):
            for doc in yaml.safe_load_all(text):
                if doc is not None:
                    doc["__file"] = name
                    self.objects.append(doc)

    def find(self, kind: str, name: str | None = None) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = self.find(kind, name)
        if len(found) != 1:
            fail(f"expected one {kind} {name or ''}, found {len(found)}")
        return found[0]


def clean(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != "__file"}


def containers(pod_owner: dict, init: bool = False) -> dict[str, dict]:
    spec = pod_owner["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers" if init else "containers", [])}


def env_names(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def flag(container: dict, name: str) -> str | None:
    for a in container.get("args", []):
        if a == name:
            return ""
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


# ---------------------------------------------------------------------------------------------
# What the Rust sources say

def src(path: str) -> str:
    return (ROOT / path).read_text()


@functools.lru_cache(maxsize=None)
def driver_name() -> str:
    m = re.search(r'pub const DRIVER_NAME: &str = "([^"]+)"', src("src/csi/mod.rs"))
    assert m, "DRIVER_NAME not found in src/csi/mod.rs"
    return m.group(1)


@functools.lru_cache(maxsize=None)
def fsx_keys() -> set[str]:
    m = re.search(r"pub const FSX_KEYS: &\[&str\] = &\[(.*?)\];", src("src/csi/params.rs"), re.S)
    assert m, "FSX_KEYS not found in src/csi/params.rs"
    return set(re.findall(r'"([^"]+)"', m.group(1)))


@functools.lru_cache(maxsize=None)
def cli_flags() -> set[str]:
    """Long flags declared by the clap structs of src/cli/ (field names in kebab case)."""
    attr = r"#\[arg\(((?:[^()]|\([^()]*\))*)\)\]\s*pub (\w+):"
    flags = set()
    for f in sorted((ROOT / "src" / "cli").glob("*.rs")):
        for args, field in re.findall(attr, f.read_text()):
            if not re.search(r"\blong\b", args):
                continue
            named = re.search(r'\blong\s*=\s*"([^"]+)"', args)
            flags.add(named.group(1) if named else field.replace("_", "-"))
    return flags


def subcommands() -> set[str]:
    body = re.search(r"pub enum Command \{(.*?)\n\}", src("src/cli/mod.rs"), re.S)
    assert body, "enum Command not found in src/cli/mod.rs"
    names = re.findall(r"^\s*(\w+)(?:\(|,)", body.group(1), re.M)
    return {re.sub(r"(?<!^)([A-Z])", r"-\1", n).lower() for n in names}


# ---------------------------------------------------------------------------------------------
# Checks: what the issue requires of the objects

def check_csidriver(r: Rendered) -> None:
    d = r.one("CSIDriver")
    assert d["metadata"]["name"] == driver_name(), f"CSIDriver name {d['metadata']['name']} != {driver_name()}"
    s = d["spec"]
    assert s["attachRequired"] is False, "attachRequired must be false"
    assert s["podInfoOnMount"] is True, "podInfoOnMount must be true"
    assert s["volumeLifecycleModes"] == ["Persistent", "Ephemeral"], s["volumeLifecycleModes"]
    assert s["fsGroupPolicy"] == "None", "fsGroupPolicy must be None (read-only data: never chown)"


def check_controller(r: Rendered) -> None:
    v = r.values
    dep = r.one("Deployment", f"{fullname(r)}-controller")
    assert dep["spec"]["replicas"] == v["controller"]["replicas"], "replicas do not follow controller.replicas"
    assert chart_defaults()["controller"]["replicas"] == 2, "2 controller replicas by default"
    cs = containers(dep)
    ctl = cs["controller"]
    assert ctl["args"][:2] == ["csi", "--mode=controller"], ctl["args"]
    assert flag(ctl, "--driver-name") == driver_name()
    want = [f"{a['namespace']}={a['location']}" for a in v["controller"]["sources"]["allowed"]]
    got = [a.split("=", 1)[1] for a in ctl["args"] if a.startswith("--allowed-reference=")]
    assert got == want, f"controller --allowed-reference {got} != controller.sources.allowed {want}"
    prov = cs["csi-provisioner"]
    assert prov["image"].startswith("registry.k8s.io/sig-storage/csi-provisioner:"), prov["image"]
    for f in ("--extra-create-metadata", "--leader-election"):
        assert flag(prov, f) is not None, f"csi-provisioner lacks {f}"
    assert "liveness-probe" in cs, "no livenessprobe sidecar in the controller"
    assert cs["liveness-probe"]["image"].startswith("registry.k8s.io/sig-storage/livenessprobe:")
    assert ctl["livenessProbe"]["httpGet"]["port"] == "healthz"
    if v["controller"]["operatorEnabled"]:
        op = cs["operator"]
        assert op["args"][0] == "operator"
        assert {"POD_NAMESPACE", "POD_NAME"} <= env_names(op), "operator needs POD_NAMESPACE and POD_NAME"
        assert flag(op, "--storage-class") == v["storageClass"]["name"], "operator's --storage-class != StorageClass"
        assert flag(op, "--driver-name") == driver_name()
    else:
        assert "operator" not in cs, "operator container present although controller.operatorEnabled=false"
    fsx_users = [ctl] + ([cs["operator"]] if v["controller"]["operatorEnabled"] else [])
    for c in fsx_users:
        if v["fsx"]["enabled"]:
            assert flag(c, "--fsx") == "", f"{c['name']}: --fsx missing with fsx.enabled"
            assert flag(c, "--cluster-name") == v["fsx"]["clusterName"], f"{c['name']}: --cluster-name != fsx.clusterName"
        else:
            assert flag(c, "--fsx") is None and flag(c, "--cluster-name") is None, f"{c['name']}: FSx flags without fsx.enabled"
    if v["controller"]["operatorEnabled"]:
        assert flag(cs["operator"], "--hp-storage-class") == v["fsx"]["storageClassName"]
    pdbs = r.find("PodDisruptionBudget")
    assert bool(pdbs) == (v["controller"]["replicas"] > 1), "a PodDisruptionBudget only with several replicas"


def fullname(r: Rendered) -> str:
    return r.release if "datastore-csi" in r.release else f"{r.release}-datastore-csi"


def check_node(r: Rendered) -> None:
    v = r.values
    ds = r.one("DaemonSet", f"{fullname(r)}-node")
    spec = ds["spec"]["template"]["spec"]
    cs = containers(ds)
    node = cs["node"]
    assert node["args"][:2] == ["csi", "--mode=node"], node["args"]
    assert node["securityContext"].get("privileged") is True, "node plugin must be privileged"
    mounts = {m["name"]: m for m in node["volumeMounts"]}
    vols = {vol["name"]: vol for vol in spec["volumes"]}
    kubelet = [m for m in node["volumeMounts"] if m["mountPath"] == v["kubeletDir"]]
    assert kubelet and kubelet[0].get("mountPropagation") == "Bidirectional", "kubelet dir needs Bidirectional propagation"
    assert vols[kubelet[0]["name"]]["hostPath"]["path"] == v["kubeletDir"]
    assert flag(node, "--kubelet-dir") == v["kubeletDir"]
    fuse = [m for m in node["volumeMounts"] if m["mountPath"] == "/dev/fuse"]
    assert fuse, "/dev/fuse not mounted into the node plugin"
    assert vols[fuse[0]["name"]]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    cache_dir = flag(node, "--cache-dir")
    cache = [m for m in node["volumeMounts"] if m["mountPath"] == cache_dir]
    assert cache, "--cache-dir is not a mounted volume"
    assert vols[cache[0]["name"]]["hostPath"]["path"] == v["node"]["cache"]["hostPath"], "cache not on the hostPath"
    assert flag(node, "--cache-size") == str(v["node"]["cache"]["size"]), "--cache-size must be node.cache.size"
    assert {"operator": "Exists"} in spec.get("tolerations", []), "node pods must tolerate every taint"
    assert "NODE_ID" in env_names(node)
    # The fd holder: its own container, same socket as the plugin's, which must not spawn one.
    holders = containers(ds, init=True)
    holder = holders.get("fd-holder") or cs.get("fd-holder")
    assert holder, "no fd-holder container"
    assert holder["args"][0] == "fd-holder"
    socket = flag(holder, "--socket")
    assert socket and flag(node, "--fd-holder-socket") == socket, "plugin and holder disagree on the socket"
    assert flag(node, "--spawn-fd-holder") == "false", "the plugin must not spawn its own holder"
    # Reference-mode objects: the node reads the locations the operator reads sources from.
    want = [f"{a['namespace']}={a['location']}" for a in v["controller"]["sources"]["allowed"]]
    got = [a.split("=", 1)[1] for a in node["args"] if a.startswith("--allowed-reference=")]
    assert got == want, f"--allowed-reference {got} != controller.sources.allowed {want}"
    holder_dirs = {m["mountPath"]: m["name"] for m in holder["volumeMounts"]}
    sock_dir = str(Path(socket).parent)
    assert sock_dir in holder_dirs and mounts.get(holder_dirs[sock_dir]), "holder socket dir not shared with the plugin"
    assert "hostPath" in vols[holder_dirs[sock_dir]], "the holder's socket must live on a hostPath"
    # preStop must never unmount the pods' mounts.
    for c in list(cs.values()) + list(holders.values()):
        hook = c.get("lifecycle", {}).get("preStop")
        text = yaml.safe_dump(hook or {})
        assert not re.search(r"umount|fusermount|unmount", text), f"{c['name']}'s preStop unmounts"
    assert node.get("lifecycle", {}).get("preStop"), "the node plugin has no preStop"
    reg = cs["node-driver-registrar"]
    assert reg["image"].startswith("registry.k8s.io/sig-storage/csi-node-driver-registrar:")
    reg_path = flag(reg, "--kubelet-registration-path")
    assert reg_path == f"{v['kubeletDir']}/plugins/{driver_name()}/csi.sock", reg_path
    assert "liveness-probe" in cs and node["livenessProbe"]["httpGet"]["port"] == "healthz"
    assert spec.get("automountServiceAccountToken") is False, "the node plugin needs no API token"
    if v["metrics"]["enabled"]:
        assert flag(node, "--metrics-addr").endswith(f":{v['metrics']['port']}")


def check_storageclasses(r: Rendered) -> None:
    v = r.values
    scs = {sc["metadata"]["name"]: sc for sc in r.find("StorageClass")}
    if v["storageClass"]["create"]:
        sc = scs[v["storageClass"]["name"]]
        assert sc["provisioner"] == driver_name()
        assert sc.get("parameters", {}).get("type", "standard") == "standard"
    hp = scs.get(v["fsx"]["storageClassName"])
    if not v["fsx"]["enabled"]:
        assert hp is None, "datastore-hp rendered although fsx.enabled is false"
        return
    assert hp is not None, "no datastore-hp StorageClass with fsx.enabled"
    assert hp["provisioner"] == driver_name()
    params = hp["parameters"]
    assert params["type"] == "high-performance"
    unknown = set(params) - fsx_keys() - {"type"}
    assert not unknown, f"parameters the controller refuses (not in FSX_KEYS): {sorted(unknown)}"
    f = v["fsx"]
    assert params["subnetId"] == f["subnetId"]
    assert params["deploymentType"] == f["deploymentType"]
    assert params["securityGroupIds"] == ",".join(f["securityGroupIds"])
    assert params["extraTags"] == ",".join(f"{k}={f['extraTags'][k]}" for k in sorted(f["extraTags"]))
    assert params["perUnitStorageThroughput"] == str(f["perUnitStorageThroughput"])
    assert all(isinstance(x, str) for x in params.values()), "StorageClass parameters must be strings"


def check_configmap(r: Rendered) -> None:
    kubectl_rs = src("src/cli/kubectl/create.rs")
    m = re.search(r'ConfigMap> = Api::namespaced\(.*?, &c\.config_namespace\);\s*'
                  r'let cm = match cms\.get_opt\("([^"]+)"\)', kubectl_rs)
    assert m, "could not find the ConfigMap lookup in src/cli/kubectl/create.rs"
    name = m.group(1)
    ns_default = re.search(r'#\[arg\(long, default_value = "([^"]+)"\)\]\s*pub config_namespace', kubectl_rs)
    assert ns_default, "could not find --config-namespace's default in src/cli/kubectl/create.rs"
    keys = set(re.findall(r'data\.get\("([^"]+)"\)', kubectl_rs))
    assert keys == {"store", "s3Endpoint", "s3Region"}, f"kubectl/create.rs reads keys {keys}; update this check and the chart"
    cm = r.one("ConfigMap", name)
    assert cm["metadata"]["namespace"] == r.namespace
    if r.release == render_manifests.RELEASE:
        assert r.namespace == ns_default.group(1), "default install namespace must be where the plugin looks"
    data = cm["data"]
    store = r.values["store"]
    want_store = store["url"] or "s3://" + store["bucket"] + ("/" + store["prefix"].strip("/") if store["prefix"].strip("/") else "")
    assert data["store"] == want_store, f"store {data['store']} != {want_store}"
    for key, value in (("s3Endpoint", store["endpoint"]), ("s3Region", store["region"])):
        if value:
            assert data.get(key) == value, f"ConfigMap {key} != store value"
        else:
            assert key not in data, f"empty {key} must be left out (an empty variable counts as set)"
    # Every container of ours takes the store from it.
    for owner in r.find("Deployment") + r.find("DaemonSet"):
        for c in containers(owner).values():
            if c["image"].startswith(r.values["image"]["repository"] + ":") and c["args"][0] != "fd-holder":
                refs = [e for e in c.get("env", []) if e["name"] == "DATASTORE_STORE"]
                assert refs and refs[0]["valueFrom"]["configMapKeyRef"] == {"name": name, "key": "store"}, c["name"]


def check_credentials(r: Rendered) -> None:
    v = r.values
    arn = v["irsa"]["roleArn"]
    for sa in r.find("ServiceAccount"):
        got = (sa["metadata"].get("annotations") or {}).get("eks.amazonaws.com/role-arn")
        assert got == (arn or None), f"ServiceAccount {sa['metadata']['name']}: IRSA annotation {got!r}, want {arn!r}"
    secret = v["credentials"]["secret"]
    ours = [
        c for owner in r.find("Deployment") + r.find("DaemonSet") for c in containers(owner).values()
        if c["image"].startswith(v["image"]["repository"] + ":")
    ]
    for c in ours:
        refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        assert refs == ([secret["name"]] if secret["name"] else []), f"{c['name']}: envFrom {refs}"
    created = r.find("Secret")
    if secret["create"]:
        s = r.one("Secret", secret["name"])
        assert set(s["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    else:
        assert not created, "a Secret was rendered without credentials.secret.create"


def check_service_monitor(r: Rendered) -> None:
    want = r.values["metrics"]["enabled"] and r.values["metrics"]["serviceMonitor"]["enabled"]
    sms = r.find("ServiceMonitor")
    assert bool(sms) == bool(want), "ServiceMonitor rendered iff metrics.serviceMonitor.enabled"
    if want:
        svc = r.one("Service")
        assert svc["spec"]["ports"][0]["port"] == r.values["metrics"]["port"]


def check_rbac(r: Rendered) -> None:
    v = r.values
    sa = {s["metadata"]["name"] for s in r.find("ServiceAccount")}
    node_sa = f"{fullname(r)}-node"
    assert node_sa in sa
    rules_by_role = {}
    for kind in ("ClusterRole", "Role"):
        for role in r.find(kind):
            rules_by_role[(kind, role["metadata"]["name"])] = role["rules"]
    granted: dict[tuple[str, str], set[str]] = {}
    for rules in rules_by_role.values():
        for rule in rules:
            for g in rule["apiGroups"]:
                for res in rule["resources"]:
                    assert "*" not in (g, res) and "*" not in rule["verbs"], f"wildcard in {rule}"
                    granted.setdefault((g, res), set()).update(rule["verbs"])
    need = {
        ("", "persistentvolumes"): {"get", "list", "watch", "create", "delete", "patch"},
        ("", "persistentvolumeclaims"): {"get", "list", "watch", "update"},
        ("storage.k8s.io", "storageclasses"): {"get", "list", "watch"},
        ("", "events"): {"create", "patch"},
        ("coordination.k8s.io", "leases"): {"get", "create", "update"},
        # The CSI controller: a claim's owning Datastore vouches for its FSx annotations, and
        # a claim whose annotations are ignored gets an Event.
        ("datastores.grid.ai", "datastores"): {"get"},
        ("events.k8s.io", "events"): {"create", "patch"},
    }
    if v["controller"]["operatorEnabled"]:
        need.update({
            ("datastores.grid.ai", "datastores"): {"get", "list", "watch", "patch"},
            ("datastores.grid.ai", "datastores/status"): {"patch"},
            ("datastores.grid.ai", "datastoreuploads"): {"get", "list", "watch", "patch", "delete"},
            ("datastores.grid.ai", "datastoreuploads/status"): {"patch"},
            ("", "pods"): {"list", "watch"},
            ("events.k8s.io", "events"): {"create", "patch"},
        })
        need[("", "persistentvolumeclaims")] |= {"create", "delete"}
        if v["controller"]["readSourceSecrets"]:
            need[("", "secrets")] = {"get"}
    for key, verbs in need.items():
        missing_verbs = verbs - granted.get(key, set())
        assert not missing_verbs, f"{key} lacks {sorted(missing_verbs)}"
    assert granted.get(("", "secrets"), set()) <= {"get"}, "Secrets: get only (no list/watch)"
    if not v["controller"]["operatorEnabled"]:
        assert granted.get(("datastores.grid.ai", "datastores")) == {"get"}, "without the operator: get Datastores only"
    check_user_roles(r)
    # Nothing is bound to the node's service account.
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        for b in r.find(kind):
            assert all(s["name"] != node_sa for s in b["subjects"]), f"{kind} binds the node service account"
    # Every rule is preceded by a comment that justifies each of its verbs ("get/list: why").
    lines = r.texts["rbac.yaml"].splitlines()
    comment: list[str] = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
        elif stripped.startswith("- apiGroups:"):
            verbs_line = next(ln for ln in lines[i:] if ln.strip().startswith("verbs:"))
            verbs = re.findall(r'"([a-z]+)"', verbs_line)
            said = " ".join(comment)
            unexplained = [vb for vb in verbs if not re.search(rf"\b{vb}\b[\w/ ]*:", said)]
            assert not unexplained, f"rbac.yaml line {i + 1}: verbs {unexplained} not justified in the comment above"
            comment = []
        elif not stripped.startswith(("resources:", "verbs:")):
            comment = []


def check_user_roles(r: Rendered) -> None:
    """Namespace users get Datastores and upload sessions through the aggregated built-in roles:
    never a status subresource (only the operator writes those), and `view` never sees upload
    sessions (their status holds upload forms)."""
    v = r.values
    roles = {c["metadata"]["name"]: c for c in r.find("ClusterRole")}
    edit, view = roles.get(f"{fullname(r)}-edit"), roles.get(f"{fullname(r)}-view")
    want = v["controller"]["operatorEnabled"] and v["controller"]["uploads"]["userRoles"]
    assert bool(edit) == bool(view) == bool(want), "aggregated user roles iff the operator runs and uploads.userRoles"
    if not want:
        return
    labels = edit["metadata"]["labels"]
    assert labels.get("rbac.authorization.k8s.io/aggregate-to-edit") == "true"
    assert labels.get("rbac.authorization.k8s.io/aggregate-to-admin") == "true"
    assert view["metadata"]["labels"].get("rbac.authorization.k8s.io/aggregate-to-view") == "true"
    edit_res = {res for rule in edit["rules"] for res in rule["resources"]}
    assert {"datastores", "datastoreuploads"} <= edit_res, edit_res
    for role in (edit, view):
        for rule in role["rules"]:
            assert rule["apiGroups"] == ["datastores.grid.ai"], rule
            assert not any(res.endswith("/status") for res in rule["resources"]), f"users never write a status: {rule}"
    assert all("datastoreuploads" not in rule["resources"] for rule in view["rules"]), "view must not read upload forms"


def check_images(r: Rendered) -> None:
    cargo = src("Cargo.toml")
    version = re.search(r'^\[package\][^\[]*?^version = "([^"]+)"', cargo, re.M | re.S).group(1)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == version, f"Chart appVersion {chart['appVersion']} != Cargo.toml version {version}"
    if not r.values["image"]["tag"]:
        for owner in r.find("Deployment") + r.find("DaemonSet"):
            for c in list(containers(owner).values()) + list(containers(owner, init=True).values()):
                if c["image"].startswith(r.values["image"]["repository"] + ":"):
                    assert c["image"].endswith(":" + version), c["image"]


def check_flags_exist(r: Rendered) -> None:
    """Every subcommand, flag and env variable the chart hands the datastore binary exists."""
    flags, subs = cli_flags(), subcommands()
    all_src = "\n".join(p.read_text() for p in sorted((ROOT / "src").rglob("*.rs")))
    unknown = []
    for owner in r.find("Deployment") + r.find("DaemonSet"):
        for c in list(containers(owner).values()) + list(containers(owner, init=True).values()):
            if not c["image"].startswith(r.values["image"]["repository"] + ":"):
                continue
            sub = c["args"][0]
            if sub not in subs:
                unknown.append(f"{c['name']}: subcommand {sub}")
            for a in c["args"][1:]:
                name = a[2:].split("=", 1)[0]
                if name not in flags:
                    unknown.append(f"{c['name']}: --{name}")
            for e in c.get("env", []):
                if not e["name"].startswith("AWS_") and f'"{e["name"]}"' not in all_src:
                    unknown.append(f"{c['name']}: env {e['name']}")
    assert not unknown, "not in src/cli (or src/): " + ", ".join(unknown)


def check_values_documented() -> None:
    """Every value in values.yaml has a comment on the line(s) right above it (or its parent's)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    in_resources = None  # indentation of a `resources:` block: Kubernetes quantities, no comments
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        if in_resources is not None and indent > in_resources:
            continue
        in_resources = indent if re.search(r"(?i)resources$", m.group(2)) else None
        j = i - 1
        while j >= 0 and lines[j].strip() == "":
            j -= 1
        if j >= 0 and lines[j].strip().startswith("#"):
            continue
        # A key whose parent block is documented and that opens the block is covered by it.
        if j >= 0 and re.match(r"^\s*[A-Za-z][\w.-]*:\s*$", lines[j]) and len(m.group(1)) > 0:
            k = j - 1
            if k >= 0 and lines[k].strip().startswith("#"):
                continue
        undocumented.append(f"values.yaml:{i + 1}: {m.group(2)}")
    assert not undocumented, "values without a comment: " + ", ".join(undocumented)
