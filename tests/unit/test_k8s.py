"""k8s/: the KubeRay manifests and the image recipe, checked offline.

- RayService objects against the KubeRay CRD OpenAPI schemas in ../shared/kuberay-crds/, strictly: a
  field the schema does not know is an error here (the API server would prune it silently).
- Native objects (and the pod templates and Service inside each RayService) against Kubernetes' own
  schemas with `kubernetes-validate`, strictly.
- serveConfigV2 against Ray's ServeDeploySchema with unknown keys rejected at any depth, agreeing with
  configs/serve.yaml, its args building the application with the resources the manifest provides.
- Security: non-root pods; every Ray container with the API key and Ray's token auth from Secrets (the
  token the one KubeRay's authOptions names); NetworkPolicies open only the Serve ports beyond the
  Ray pods, and admit other namespaces' pods by namespace AND label in one entry.
- The CPU variant's serveConfigV2 running on a local Ray (`serve run`), answering /v1/completions.
"""

from __future__ import annotations

import copy
import json
import re
import typing
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRDS = ROOT.parent / "shared" / "kuberay-crds"
K8S_VERSION = "1.32"  # the Kubernetes schemas the native objects are checked against

MANIFESTS = sorted(K8S.glob("*.yaml"))
RAYSERVICES = [p for p in MANIFESTS if any(d["kind"] == "RayService" for d in yaml.safe_load_all(p.read_text()))]


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def rayservice(path: Path) -> dict:
    return next(d for d in docs(path) if d["kind"] == "RayService")


def serve_config(path: Path) -> dict:
    return yaml.safe_load(rayservice(path)["spec"]["serveConfigV2"])


# ---------------------------------------------------------------- KubeRay CRD schema


def strict(schema):
    """The CRD schema with additionalProperties: false wherever properties are listed and unknown
    fields are not explicitly preserved: what `kubectl apply --validate=strict` enforces."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (the shared folder beside the checkout); cannot validate {kind}")
    crd = yaml.safe_load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def crd_errors(obj: dict) -> list[str]:
    assert obj["apiVersion"] == "ray.io/v1", obj["apiVersion"]
    v = crd_validator(obj["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(obj)]


def test_k8s_folder_has_both_variants_and_the_image():
    names = {p.name for p in MANIFESTS}
    assert {"rayservice-mixtral-8x7b.yaml", "rayservice-tiny-cpu.yaml"} <= names
    assert (K8S / "Dockerfile").is_file()


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_rayservice_validates_against_kuberay_crd(path):
    assert crd_errors(rayservice(path)) == []


def test_crd_validation_catches_a_typo_and_a_wrong_type():
    obj = rayservice(K8S / "rayservice-mixtral-8x7b.yaml")
    typo = copy.deepcopy(obj)
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    assert any("minReplica" in e for e in crd_errors(typo))
    wrong = copy.deepcopy(obj)
    wrong["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["rayStartParams"]["num-cpus"] = 4  # must be a string
    assert any("rayStartParams" in e for e in crd_errors(wrong))


# ---------------------------------------------------------------- Kubernetes' own schemas


def native_objects(path: Path) -> list[dict]:
    """Every object Kubernetes itself validates: top-level native objects, plus each pod template and
    the Serve Service inside a RayService."""
    out = []
    for d in docs(path):
        if d["kind"] != "RayService":
            out.append(d)
            continue
        rc = d["spec"]["rayClusterConfig"]
        groups = [("head", rc["headGroupSpec"])] + [(g["groupName"], g) for g in rc["workerGroupSpecs"]]
        for name, g in groups:
            out.append(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": g["template"]}
            )
        if "serveService" in d["spec"]:
            out.append({"apiVersion": "v1", "kind": "Service", **d["spec"]["serveService"]})
    return out


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_native_objects_validate_against_kubernetes_schemas(path):
    objs = native_objects(path)
    assert objs
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_kubernetes_validation_catches_a_bad_pod_template():
    obj = next(o for o in native_objects(K8S / "rayservice-mixtral-8x7b.yaml") if o["kind"] == "PodTemplate")
    bad = copy.deepcopy(obj)
    bad["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_pods_expose_serve_ports_and_set_requests_and_limits():
    for path in RAYSERVICES:
        rc = rayservice(path)["spec"]["rayClusterConfig"]
        assert rc["enableInTreeAutoscaling"] is True and rc["autoscalerOptions"]["idleTimeoutSeconds"] > 0
        assert rc["rayVersion"] == ray_pin()
        for g in [rc["headGroupSpec"], *rc["workerGroupSpecs"]]:
            c = g["template"]["spec"]["containers"][0]
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports["serve"] == 8000 and ports["serve-grpc"] == 9000, path.name
            assert c["resources"]["requests"] and c["resources"]["limits"], path.name
        for g in rc["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        svc_ports = {p["name"]: p["port"] for p in rayservice(path)["spec"]["serveService"]["spec"]["ports"]}
        assert svc_ports == {"serve": 8000, "serve-grpc": 9000}


# ---------------------------------------------------------------- security properties


def pod_specs(path: Path) -> list[tuple[str, dict]]:
    """(name, pod spec) of every pod a manifest makes: RayService groups, Jobs, Deployments."""
    out = []
    for o in native_objects(path):
        t = o.get("template") or (o.get("spec") or {}).get("template")
        if t:
            out.append((f"{path.name}:{o['metadata'].get('name')}", t["spec"]))
    return out


def test_every_pod_runs_as_non_root_without_privileges():
    specs = [ps for p in MANIFESTS for ps in pod_specs(p)]
    assert len(specs) >= 6
    for name, spec in specs:
        sc = spec.get("securityContext") or {}
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, name
        assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for c in spec["containers"] + spec.get("initContainers", []):
            csc = c.get("securityContext") or {}
            assert csc.get("allowPrivilegeEscalation") is False, (name, c["name"])
            assert "ALL" in csc.get("capabilities", {}).get("drop", []), (name, c["name"])
            assert not csc.get("privileged"), (name, c["name"])
    for path in RAYSERVICES:  # KubeRay's autoscaler sidecar, too
        csc = rayservice(path)["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False and "ALL" in csc["capabilities"]["drop"], path.name


def test_secrets_the_manifests_name_are_required():
    found = 0
    for path in MANIFESTS:
        for name, spec in pod_specs(path):
            for c in spec["containers"]:
                for e in c.get("env", []):
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                    if ref:
                        found += 1
                        assert not ref.get("optional"), f"{name}: {e['name']} must not be optional (missing = no auth)"
    assert found >= 2 * len(RAYSERVICES)  # each RayService requires its API key and its Ray token


RAY_TOKEN_SECRET_KEY = "auth_token"  # the key KubeRay reads in authOptions.secretName (RAY_AUTH_TOKEN_SECRET_KEY)


def ray_containers(rs: dict) -> list[tuple[str, dict]]:
    """(where, container) of every container of a RayService's Ray pods (head and every worker group,
    init containers too): each runs Ray, and any of them may host the mixserve ingress."""
    rc = rs["spec"]["rayClusterConfig"]
    out = []
    for g in [rc["headGroupSpec"], *rc["workerGroupSpecs"]]:
        spec = g["template"]["spec"]
        for c in spec["containers"] + spec.get("initContainers", []):
            out.append((f"{g.get('groupName', 'head')}/{c['name']}", c))
    return out


def env_problems(where: str, env: list[dict], secret_env: dict[str, tuple[str, str] | None]) -> list[str]:
    """What is wrong with `env` against RAY_AUTH_MODE=token plus, for each name in `secret_env`, exactly
    one entry read from a required secretKeyRef (to the (secret, key) given, where one is given)."""
    bad = []
    names = [e["name"] for e in env]
    mode = [e for e in env if e["name"] == "RAY_AUTH_MODE"]
    if len(mode) != 1 or mode[0].get("value") != "token" or "valueFrom" in mode[0]:
        bad.append(f"{where}: RAY_AUTH_MODE must be set once, to token: {mode}")
    for name, want in secret_env.items():
        if names.count(name) != 1:
            bad.append(f"{where}: {name} set {names.count(name)} times, want once")
            continue
        e = next(e for e in env if e["name"] == name)
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if "value" in e or not ref:
            bad.append(f"{where}: {name} must come from a secretKeyRef, not a literal")
        elif ref.get("optional"):
            bad.append(f"{where}: {name} must not be optional (missing = no auth)")
        elif want is not None and (ref.get("name"), ref.get("key")) != want:
            bad.append(f"{where}: {name} reads {ref}, want secret {want[0]} key {want[1]}")
    return bad


def auth_problems(rs: dict) -> list[str]:
    """Every Ray container of a RayService (and the autoscaler sidecar) runs with Ray's token auth,
    the token from the Secret KubeRay's authOptions names (the operator authenticates its dashboard
    calls with it), and every Ray container has the mixserve API key from a Secret."""
    rc = rs["spec"]["rayClusterConfig"]
    opts = rc.get("authOptions") or {}
    if opts.get("mode") != "token" or not opts.get("secretName") or opts.get("enableK8sTokenAuth"):
        return [f"authOptions must be mode token with a secretName: {opts}"]
    token = (opts["secretName"], RAY_TOKEN_SECRET_KEY)
    bad = []
    for where, c in ray_containers(rs):
        bad += env_problems(where, c.get("env", []), {"RAY_AUTH_TOKEN": token, "MIXSERVE_API_KEY": None})
    bad += env_problems("autoscaler", rc["autoscalerOptions"].get("env", []), {"RAY_AUTH_TOKEN": token})
    return bad


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_every_ray_container_has_the_api_key_and_ray_token_auth_from_secrets(path):
    assert auth_problems(rayservice(path)) == []


def test_both_rayservices_are_checked_for_auth():
    assert {p.name for p in RAYSERVICES} >= {"rayservice-mixtral-8x7b.yaml", "rayservice-tiny-cpu.yaml"}


def test_the_auth_check_catches_each_way_to_serve_without_a_key_or_token():
    rs = rayservice(K8S / "rayservice-tiny-cpu.yaml")
    assert auth_problems(rs) == []

    def env_of(obj, group):  # the first container of worker group `group` (-1 = head)
        rc = obj["spec"]["rayClusterConfig"]
        g = rc["headGroupSpec"] if group < 0 else rc["workerGroupSpecs"][group]
        return g["template"]["spec"]["containers"][0]["env"]

    def mutated(change):
        obj = copy.deepcopy(rs)
        change(obj)
        return auth_problems(obj)

    def entry(o, var, group):
        return next(e for e in env_of(o, group) if e["name"] == var)

    def drop(var, group):
        return lambda o: env_of(o, group).remove(entry(o, var, group))

    def replace(var, group, **fields):  # the entry becomes {name: var, **fields}
        return lambda o: (drop(var, group)(o), env_of(o, group).append({"name": var, **fields}))

    def ref(var, group, **fields):
        return lambda o: entry(o, var, group)["valueFrom"]["secretKeyRef"].update(fields)

    cases = {
        "no API key on a worker (the tiny manifest before)": drop("MIXSERVE_API_KEY", 0),
        "no API key on the head": drop("MIXSERVE_API_KEY", -1),
        "no Ray token": drop("RAY_AUTH_TOKEN", 0),
        "no auth mode": drop("RAY_AUTH_MODE", -1),
        "auth mode disabled": replace("RAY_AUTH_MODE", 0, value="disabled"),
        "a literal key": replace("MIXSERVE_API_KEY", -1, value="changeme"),
        "an optional key": ref("MIXSERVE_API_KEY", 0, optional=True),
        "a token from another secret than authOptions names": ref("RAY_AUTH_TOKEN", -1, name="other"),
        "the token from another key": ref("RAY_AUTH_TOKEN", 0, key="token"),
        "the token set twice": lambda o: env_of(o, 0).append({"name": "RAY_AUTH_TOKEN", "value": "x"}),
        "no authOptions (the operator would not send the token)": lambda o: o["spec"]["rayClusterConfig"].pop(
            "authOptions"
        ),
        "no token for the autoscaler": lambda o: o["spec"]["rayClusterConfig"]["autoscalerOptions"].pop("env"),
    }
    for case, change in cases.items():
        assert mutated(change), case


def policy_for(path: Path, labels: dict) -> dict:
    pols = [
        d
        for d in docs(path)
        if d["kind"] == "NetworkPolicy" and d["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    assert len(pols) == 1, f"{path.name}: no (single) NetworkPolicy selects pods labelled {labels}"
    return pols[0]


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_only_the_serve_ports_are_open_beyond_the_ray_pods(path):
    rs = rayservice(path)
    rc = rs["spec"]["rayClusterConfig"]
    groups = [rc["headGroupSpec"], *rc["workerGroupSpecs"]]
    labels = [g["template"]["metadata"]["labels"] for g in groups]
    pol = policy_for(path, labels[0])
    sel = pol["spec"]["podSelector"]["matchLabels"]
    assert all(sel.items() <= lab.items() for lab in labels), "the policy must select every Ray pod"
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    open_ports, restricted = exposure(pol)
    assert open_ports == {8000, 9000}
    assert restricted == {"kuberay-operator": {8265}, "prometheus": {8080}} or restricted == {
        "kuberay-operator": {8265}
    }
    for g in groups:  # no Ray client server port, and the gRPC proxy's message bound is set everywhere
        c = g["template"]["spec"]["containers"][0]
        assert 10001 not in {p["containerPort"] for p in c["ports"]}
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert int(env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]) <= 16 << 20


def exposure(pol: dict) -> tuple[set[int], dict[str, set[int]]]:
    """(ports open to any peer, {peer app: ports}) of a NetworkPolicy; its own pods are not counted."""
    sel = pol["spec"]["podSelector"]["matchLabels"]
    open_ports, restricted = set(), {}
    for rule in pol["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if "from" not in rule:
            assert ports, "a rule with neither `from` nor `ports` admits everything"
            open_ports |= ports
            continue
        for peer in rule["from"]:
            if peer.get("podSelector", {}).get("matchLabels") == sel and "namespaceSelector" not in peer:
                continue  # the Ray pods themselves
            assert ports, f"a rule admitting {peer} must name its ports"
            app = peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
            restricted.setdefault(app, set()).update(ports)
    return open_ports, restricted


def test_the_port_check_catches_an_open_dashboard_and_an_open_rule():
    pol = next(d for d in docs(RAYSERVICES[0]) if d["kind"] == "NetworkPolicy")
    bad = copy.deepcopy(pol)
    bad["spec"]["ingress"].append({"ports": [{"port": 8265, "protocol": "TCP"}]})
    assert 8265 in exposure(bad)[0]
    bad = copy.deepcopy(pol)
    bad["spec"]["ingress"].append(
        {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "anything"}}}]}
    )
    with pytest.raises(AssertionError, match="must name its ports"):
        exposure(bad)


def network_policies() -> list[tuple[str, dict]]:
    """Every NetworkPolicy under k8s/ (monitoring/ too)."""
    out = []
    for p in sorted(K8S.rglob("*.y*ml")):
        for d in yaml.safe_load_all(p.read_text()):
            if isinstance(d, dict) and d.get("kind") == "NetworkPolicy":
                out.append((f"{p.relative_to(K8S)}:{d['metadata']['name']}", d))
    return out


def peer_problems(pol: dict) -> list[str]:
    """`from` entries of a NetworkPolicy that admit more than they should. Allowed: the policy's own
    pods (a bare podSelector equal to the policy's, which means this namespace only), and a peer in
    another namespace named by ONE entry holding both a namespaceSelector on
    kubernetes.io/metadata.name and a non-empty podSelector. Not allowed: `namespaceSelector: {}`
    (every namespace), a namespaceSelector without a podSelector (every pod there), a podSelector
    alone for anything but the own pods, the two selectors as separate entries (either admits), ipBlock."""
    sel = pol["spec"]["podSelector"]["matchLabels"]
    bad = []
    for rule in pol["spec"].get("ingress", []):
        for peer in rule.get("from", []):
            if set(peer) == {"podSelector"} and peer["podSelector"] == {"matchLabels": sel}:
                continue  # the Ray pods themselves, same namespace
            ns = peer.get("namespaceSelector")
            pods = peer.get("podSelector")
            if (
                set(peer) != {"namespaceSelector", "podSelector"}
                or set(ns or {}) != {"matchLabels"}
                or not ns["matchLabels"].get("kubernetes.io/metadata.name")
                or set(pods or {}) != {"matchLabels"}
                or not pods["matchLabels"]
            ):
                bad.append(f"ports {[p['port'] for p in rule.get('ports', [])] or 'all'} admit {peer}")
    return bad


def test_every_network_policy_admits_other_namespaces_by_namespace_and_label():
    pols = network_policies()
    assert len(pols) >= len(RAYSERVICES)
    for name, pol in pols:
        assert peer_problems(pol) == [], name
    for path in RAYSERVICES:  # the dashboard (code execution) and GCS are among the ports so guarded
        pol = next(d for d in docs(path) if d["kind"] == "NetworkPolicy")
        admitted = {p["port"] for r in pol["spec"]["ingress"] if "from" in r for p in r.get("ports", [])}
        assert 8265 in admitted and 6379 not in admitted, path.name


def test_the_peer_check_catches_a_label_from_any_namespace():
    pol = next(d for d in docs(K8S / "rayservice-tiny-cpu.yaml") if d["kind"] == "NetworkPolicy")
    assert peer_problems(pol) == []
    operator = {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
    ns = {"matchLabels": {"kubernetes.io/metadata.name": "ray-system"}}
    dashboard = [{"port": 8265, "protocol": "TCP"}]
    shapes = {
        "the label in any namespace (the manifests before)": [{"namespaceSelector": {}, "podSelector": operator}],
        "namespace OR label, as two entries": [{"namespaceSelector": ns}, {"podSelector": operator}],
        "the whole namespace": [{"namespaceSelector": ns}],
        "a bare podSelector of another app": [{"podSelector": operator}],
        "a namespace by a label other than its name (set by the API server)": [
            {"namespaceSelector": {"matchLabels": {"team": "ray"}}, "podSelector": operator}
        ],
        "an address block": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
    }
    for shape, peers in shapes.items():
        bad = copy.deepcopy(pol)
        bad["spec"]["ingress"].append({"from": peers, "ports": dashboard})
        assert peer_problems(bad), shape


# ---------------------------------------------------------------- serveConfigV2


def unknown_keys(model: type[BaseModel], data, where: str = "") -> list[str]:
    """Keys of `data` that `model` (a pydantic schema of Ray's) does not define, at any depth.
    Ray's deploy schema accepts and ignores some unknown keys; this does not."""
    from ray.serve.config import AutoscalingConfig

    free_form = {"autoscaling_config": AutoscalingConfig}  # typed as dict in the schema, a model in Ray
    if not isinstance(data, dict):
        return []
    fields = {}
    for name, f in model.model_fields.items():
        fields[name] = f
        if f.alias:
            fields[f.alias] = f
    bad = []
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            bad.append(path)
            continue
        sub = free_form.get(key) or submodel(fields[key].annotation)
        if sub is None:
            continue
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            bad += unknown_keys(sub, item, f"{path}[{i}]" if isinstance(value, list) else path)
    return bad


def submodel(annotation):
    """The pydantic model inside Optional[...] / List[...] / Union[...], if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        m = submodel(arg)
        if m is not None:
            return m
    return None


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_serve_config_v2_validates_with_ray_schema_and_no_unknown_keys(path):
    from ray.serve.schema import ServeDeploySchema

    cfg = serve_config(path)
    ServeDeploySchema.model_validate(cfg)
    assert unknown_keys(ServeDeploySchema, cfg) == []


def test_unknown_key_check_finds_keys_ray_would_ignore():
    from ray.serve.schema import ServeDeploySchema

    cfg = serve_config(K8S / "rayservice-tiny-cpu.yaml")
    cfg["http_options"]["hots"] = "0.0.0.0"
    cfg["applications"][0]["deployments"] = [
        {"name": "AttentionWorker", "autoscaling_config": {"min_replicas": 1, "max_replica": 4}}
    ]
    ServeDeploySchema.model_validate(cfg)  # Ray itself accepts this
    assert unknown_keys(ServeDeploySchema, cfg) == [
        "http_options.hots",
        "applications[0].deployments[0].autoscaling_config.max_replica",
    ]


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_serve_config_v2_is_configs_serve_yaml(path):
    """Same application as configs/serve.yaml. Differences allowed: the bind address (the cluster's
    proxies listen on all interfaces; locally loopback) and which mixserve config file args name."""
    local = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    k8s = serve_config(path)
    assert k8s["http_options"].pop("host") == "0.0.0.0"
    assert local["http_options"].pop("host") == "127.0.0.1"
    for app in local["applications"] + k8s["applications"]:
        assert (ROOT / app["args"].pop("config")).is_file()
    assert k8s == local


def test_serve_config_v2_args_are_valid_mixserve_configs():
    from cluster.config import load_config
    from cluster.serve.app import resolve_config_path

    for path in RAYSERVICES:
        for app in serve_config(path)["applications"]:
            args = dict(app["args"])
            load_config(resolve_config_path(args.pop("config")), args)
            module, attr = app["import_path"].split(":")
            assert callable(getattr(__import__(module, fromlist=[attr]), attr))


def ray_pin() -> str:
    pin = re.search(r'"ray\[serve\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    return pin.group(1)


def group_resources(group: dict) -> dict[str, float]:
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def test_mixtral_args_build_the_app_placed_on_the_manifests_groups(tmp_path):
    """The GPU variant's args build the deployment graph (from the real Mixtral-8x7B config.json),
    and every Ray resource a deployment asks for is offered by some group of the manifest."""
    from ray.serve._private.build_app import build_app as build_serve_app

    from cluster.serve.app import app_builder
    from model.tiny import preset_config

    (tmp_path / "config.json").write_text(json.dumps(preset_config("mixtral-8x7b").to_hf_dict()))
    obj = rayservice(K8S / "rayservice-mixtral-8x7b.yaml")
    (app,) = serve_config(K8S / "rayservice-mixtral-8x7b.yaml")["applications"]
    built = build_serve_app(app_builder({**app["args"], "model": str(tmp_path)}), name=app["name"])
    deps = {d.name: d for d in built.deployments}
    experts = [d for n, d in deps.items() if n.startswith("expert-group-")]
    assert len(experts) == 8 and "AttentionWorker" in deps and built.ingress_deployment_name == "OpenAIIngress"

    rc = obj["spec"]["rayClusterConfig"]
    groups = [rc["headGroupSpec"], *rc["workerGroupSpecs"]]
    demand: dict[str, float] = {}
    for d in deps.values():
        opts = d.ray_actor_options or {}
        wants = {k: v for k, v in (opts.get("resources") or {}).items() if v > 0}
        assert wants, f"{d.name} has no placement resource"
        hosts = [g for g in groups if all(group_resources(g).get(k, 0) >= v for k, v in wants.items())]
        assert hosts, f"no group offers {wants} for {d.name}"
        for g in hosts:
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits.get("nvidia.com/gpu", 0)) >= (opts.get("num_gpus") or 0), d.name
        auto = d._deployment_config.autoscaling_config
        most = auto.max_replicas if auto else d.num_replicas
        for k, v in wants.items():
            demand[k] = demand.get(k, 0) + v * most
    # At full size (maxReplicas of every group) the cluster holds every replica the config may ask for.
    for k, need in demand.items():
        offer = sum(group_resources(g).get(k, 0) * g.get("maxReplicas", 1) for g in groups)
        assert need <= offer, f"{k}: the config may run {need} replicas, the manifest offers {offer}"


# ---------------------------------------------------------------- the image recipe


def test_dockerfile_base_matches_the_pins_and_copies_what_exists():
    text = (K8S / "Dockerfile").read_text()
    base = re.search(r"ARG BASE_IMAGE=rayproject/ray:([0-9.]+)-py(\d)(\d+)", text)
    assert base and base.group(1) == ray_pin()
    for src in re.findall(r"^COPY (?:--\S+ )*(.+?) \S+$", text, re.M):
        for s in src.split():
            assert (ROOT / s).exists(), f"Dockerfile copies {s}, which is not in the repository"
    assert re.search(r"pip install .* -e \.", text), "the image must install the project"
    for path in RAYSERVICES:
        for c in [rayservice(path)["spec"]["rayClusterConfig"]["headGroupSpec"]]:
            assert "mixserve" in c["template"]["spec"]["containers"][0]["image"]


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_the_expert_data_plane_port_range_is_configured_named_and_open_between_ray_pods(path):
    """The config the manifest deploys pins the data plane to a port range; every Ray pod names its
    first port `expert-data`, and the NetworkPolicy admits it from the RayService's own pods only."""
    from cluster.config import load_config
    from cluster.serve.app import resolve_config_path

    app = serve_config(path)["applications"][0]
    args = dict(app["args"])
    first, last = load_config(resolve_config_path(args.pop("config")), args).experts.channel_ports
    rc = rayservice(path)["spec"]["rayClusterConfig"]
    groups = [rc["headGroupSpec"], *rc["workerGroupSpecs"]]
    for g in groups:
        ports = {p["name"]: p["containerPort"] for p in g["template"]["spec"]["containers"][0]["ports"]}
        assert ports.get("expert-data") == first
    pol = policy_for(path, groups[0]["template"]["metadata"]["labels"])
    sel = pol["spec"]["podSelector"]["matchLabels"]
    own = [
        r
        for r in pol["spec"]["ingress"]
        if any(
            p.get("podSelector", {}).get("matchLabels") == sel and "namespaceSelector" not in p
            for p in r.get("from", [])
        )
    ]
    assert own and all(
        "ports" not in r or any(p["port"] <= first and p.get("endPort", p["port"]) >= last for p in r["ports"])
        for r in own
    )
    open_ports, restricted = exposure(pol)
    assert not any(first <= p <= last for p in open_ports | set().union(*restricted.values()))


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_every_ray_container_runs_serve_in_mixserves_mode(path):
    """The Serve mode `mixserve serve` sets for its own Ray (cluster.config.SERVE_ENV) is in the
    environment of every Ray container, so the proxies and controller on KubeRay run in it too."""
    from cluster.config import HAPROXY_BINARY_KEY, HAPROXY_WRAPPER, SERVE_ENV, THREAD_ENV

    spec = rayservice(path)["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for g in groups:
        for c in g["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV, (path.name, c["name"])
            assert {k: env.get(k) for k in THREAD_ENV} == THREAD_ENV, (path.name, c["name"])  # torch's thread wait
            # HAProxy mode: Serve starts the wrapper the image installs beside its Python
            # (k8s/Dockerfile: pip install on the rayproject/ray base, /home/ray/anaconda3)
            assert env.get(HAPROXY_BINARY_KEY) == f"/home/ray/anaconda3/bin/{HAPROXY_WRAPPER}", (path.name, c["name"])
