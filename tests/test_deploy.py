"""Offline checks of deploy/: render every overlay, validate every object, pin the cross-file invariants."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from serving.metrics import AUTOSCALING_METRIC, METRIC_NAMES, Metrics
from serving.types import RequestStats

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "k8s" / "overlays").iterdir() if p.is_dir())
CUSTOM_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): Path(__file__).parent
    / "deploy_schemas"
    / "servicemonitor-v1.json"
}
HPA_METRIC = AUTOSCALING_METRIC.replace(":", "_")  # Kubernetes metric names cannot hold ':'

sys.path.insert(0, str(DEPLOY))
import render  # noqa: E402  (deploy/render.py, not a package)

try:
    import kubernetes_validate
except ImportError:  # only the schema tests need it; the invariants still run
    kubernetes_validate = None
K8S_VERSION = kubernetes_validate.latest_version() if kubernetes_validate else None
needs_validator = pytest.mark.skipif(kubernetes_validate is None, reason="pip install kubernetes-validate")


def rendered(overlay: str) -> list[dict]:
    return render.render(DEPLOY / "k8s" / "overlays" / overlay)


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def server_container(objects: list[dict]) -> dict:
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "server")


def flag(args: list[str], name: str, default: str | None = None) -> str | None:
    return args[args.index(name) + 1] if name in args else default


def test_overlays_exist():
    assert {"gpu", "cpu-demo"} <= set(OVERLAYS)


# -- schema validation ------------------------------------------------------------------------------


@needs_validator
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(overlay):
    objects = rendered(overlay)
    assert objects
    print(f"kubernetes schema version {K8S_VERSION} (kubernetes-validate)")
    for obj in objects:
        ident = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        custom = CUSTOM_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if custom is not None:
            jsonschema.validate(obj, json.loads(custom.read_text()))
            print(f"{ident}: validated against {custom.name} (written from the CRD)")
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{ident}: {err.message} at {list(err.path)}")


def test_custom_schema_rejects_a_typo():
    objects = rendered("gpu")
    monitor = one(objects, "ServiceMonitor")
    schema = json.loads(CUSTOM_SCHEMAS[("monitoring.coreos.com/v1", "ServiceMonitor")].read_text())
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, schema)


@needs_validator
def test_strict_validation_rejects_a_typo():
    deployment = one(rendered("gpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 90
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


# -- the renderer against kubectl's kustomize --------------------------------------------------------


def identity(obj: dict) -> tuple:
    return obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_matches_kubectl_kustomize(overlay):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: only the Python renderer was checked")
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    theirs = {identity(o): o for o in yaml.safe_load_all(out.stdout) if o}
    ours = {identity(o): o for o in rendered(overlay)}
    assert ours.keys() == theirs.keys()
    for key, obj in ours.items():
        assert obj == theirs[key], key


def test_renderer_strategic_merge_subset():
    base = {"spec": {"containers": [{"name": "a", "image": "x", "args": ["1"]}, {"name": "b"}], "keep": 1}}
    patch = {
        "spec": {
            "containers": [{"name": "a", "args": ["2"]}, {"name": "b", "$patch": "delete"}],
            "keep": None,
        }
    }
    assert render.strategic_merge(base, patch) == {
        "spec": {"containers": [{"name": "a", "image": "x", "args": ["2"]}]}
    }
    obj = {"spec": {"limits": {"nvidia.com/gpu": 1}, "list": [1, 2]}}
    render.json6902(obj, {"op": "remove", "path": "/spec/limits/nvidia.com~1gpu"})
    render.json6902(obj, {"op": "add", "path": "/spec/list/-", "value": 3})
    assert obj == {"spec": {"limits": {}, "list": [1, 2, 3]}}
    assert render.split_image("reg:5000/ns/img") == ("reg:5000/ns/img", "")
    assert render.split_image("reg:5000/ns/img:1.2") == ("reg:5000/ns/img", "1.2")


# -- invariants --------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_graceful_shutdown(overlay):
    objects = rendered(overlay)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = server_container(objects)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
        assert container[probe]["httpGet"]["port"] in ("http", 8000), probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # weights + graph capture
    shutdown = float(flag(container["args"], "--shutdown-timeout", "60"))
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > float(pre_stop[1]) + shutdown
    # a draining pod answers 503 on /health: liveness must tolerate that for the whole grace period
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= grace
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"mountPath": "/dev/shm", "name": "dshm"} in container["volumeMounts"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_non_root(overlay):
    objects = rendered(overlay)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert server_container(objects)["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o.startswith("gpu")])
def test_gpu_overlays_request_a_gpu_and_mount_the_model(overlay):
    objects = rendered(overlay)
    container = server_container(objects)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert flag(container["args"], "--device") == "cuda"
    model = flag(container["args"], "--model")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
    assert model.startswith(mount["mountPath"] + "/") and mount["readOnly"] is True
    assert by_kind(objects, "HorizontalPodAutoscaler")


def test_cpu_demo_has_no_gpu_and_one_replica():
    objects = rendered("cpu-demo")
    container = server_container(objects)
    resources = json.dumps(container["resources"])
    assert "nvidia.com/gpu" not in resources
    assert flag(container["args"], "--device") == "cpu"
    assert one(objects, "Deployment")["spec"]["replicas"] == 1
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    assert not hpas or all(h["spec"]["minReplicas"] == h["spec"]["maxReplicas"] for h in hpas)
    # no custom resources: the demo applies on a cluster without the Prometheus Operator
    assert all(o["apiVersion"].split("/")[0] in ("v1", "apps", "policy", "autoscaling") for o in objects)


def test_hpa_metric_matches_adapter_rule_and_server_metric():
    objects = rendered("gpu")
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(objects, "Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == HPA_METRIC
    config = yaml.safe_load(one(objects, "ConfigMap")["data"]["config.yaml"])
    (rule,) = config["rules"]
    assert rule["seriesQuery"].startswith(AUTOSCALING_METRIC + "{")
    assert re.fullmatch(rule["name"]["matches"], AUTOSCALING_METRIC)
    assert rule["name"]["as"] == HPA_METRIC
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert AUTOSCALING_METRIC in METRIC_NAMES


def test_service_and_monitor_select_the_pods():
    objects = rendered("gpu")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


# -- image -------------------------------------------------------------------------------------------


def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert instructions[0].startswith("FROM nvidia/cuda:") and "runtime" in instructions[0]
    assert 'ENTRYPOINT ["infinitevl", "serve"]' in instructions
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert 'pip install ".[gpu]"' in text
    assert "/models" in text and not re.search(r"^COPY .*\.safetensors", text, re.M)
    assert (DEPLOY / ".dockerignore").read_text() == (DEPLOY / "Dockerfile.dockerignore").read_text()


# -- dashboard ---------------------------------------------------------------------------------------


def exposed_sample_names() -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    m = Metrics(model_name="m", backend="torch", state_dtype="float32", model_dtype="float32")
    m.on_http("/v1/chat/completions", "POST", 200, 0.1)
    m.on_request_finished(RequestStats(arrival_time=0.0, finish_time=1.0, finish_reason="stop"))
    body = m.render()[0].decode()
    return {s.name for fam in text_string_to_metric_families(body) for s in fam.samples}


def test_dashboard_queries_only_exposed_metrics():
    dashboard = json.loads((DEPLOY / "grafana" / "infinitevl-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queried = {name for expr in exprs for name in re.findall(r"infinitevl:[a-z0-9_]+", expr)}
    exposed = exposed_sample_names()
    missing = queried - exposed
    assert not missing, missing
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in (
        "throughput",
        "first token",
        "inter-token",
        "end-to-end",
        "waiting",
        "slot",
        "reason",
        "status",
    ):
        assert topic in titles, topic
    for quantile in ("0.5", "0.9", "0.99"):
        assert any(f"histogram_quantile({quantile}, " in e and "time_to_first_token" in e for e in exprs)


def test_metrics_doc_covers_every_metric():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    for name in METRIC_NAMES:
        assert f"`{name}`" in doc, name
    assert AUTOSCALING_METRIC in doc and HPA_METRIC in doc


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_accepts_the_manifest_flags(overlay):
    cli = pytest.importorskip("serving.cli", reason="serving/cli.py not written yet")
    args = server_container(rendered(overlay))["args"]
    parsed = cli.build_parser().parse_args(["serve", *args])
    assert parsed.port == server_container(rendered(overlay))["ports"][0]["containerPort"]
    assert parsed.host == "0.0.0.0"


def test_server_accepts_the_image_default_flags():
    cli = pytest.importorskip("serving.cli", reason="serving/cli.py not written yet")
    cmd = next(line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line.startswith("CMD "))
    cli.build_parser().parse_args(["serve", *json.loads(cmd.removeprefix("CMD "))])
