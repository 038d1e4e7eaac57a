"""deploy/kubernetes, checked without a cluster: every object against Kubernetes' schemas
(kubernetes-validate) or its CRD's (cloudcoil's models of KEDA and prometheus-operator), and
against Dawet's own code: settings, routes, ports, queue names and the worker's drain.

The kustomizations are rendered here, without kubectl: resources, namespace, images and inline
JSON 6902 patches, which is all deploy/kubernetes uses. A kustomization with any other field
fails the test, so a new kustomize feature gets rendered here before it is used there. Where
kubectl is installed, its rendering is compared with this one.
"""
from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import kubernetes_validate
import pydantic
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication
from kombu.transport.redis import PRIORITY_STEPS

from api.admission import KOMBU_REDIS_PRIORITY_SUFFIXES
from conftest import ROOT
from dawet.processes import api_argv
from dawet.settings import Settings
from model_store.registry import Registry, load_registry
from tasks.jobs.contract import Lane
from tasks.worker.app import LANE_PRIORITY

DEPLOY = ROOT / "deploy/kubernetes"
DOCS = ROOT / "docs/kubernetes.md"
KUBERNETES_VERSION = "1.30"
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
CLUSTER_SCOPED = {"Namespace"}
WORKLOADS = {"Deployment", "StatefulSet"}
# Manifests applied on their own (`kubectl apply -f`), in no kustomization.
STANDALONE = [DEPLOY / "models-loader.yaml"]
KUSTOMIZATIONS = sorted(p.parent.relative_to(DEPLOY).as_posix()
                        for p in DEPLOY.rglob("kustomization.yaml"))
DEFAULT = "."  # `kubectl apply -k deploy/kubernetes`


# --- rendering -------------------------------------------------------------------------------

def load_text(text: str) -> list[dict]:
    """The non-empty YAML documents of a text."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def load_documents(path: Path) -> list[dict]:
    return load_text(path.read_text())


def render(directory: Path, visited: tuple[Path, ...] = ()) -> list[dict]:
    """What `kubectl kustomize directory` prints, for the fields KUSTOMIZE_FIELDS names."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(spec) <= KUSTOMIZE_FIELDS, f"{directory}: render {set(spec) - KUSTOMIZE_FIELDS} here"
    visited += (directory,)
    docs: list[dict] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            # kustomize refuses a directory that holds one it is rendering (`../..`: a cycle).
            assert not any(v.is_relative_to(path) for v in visited), f"{directory}: {entry}"
            docs += render(path, visited)
        else:
            docs += load_documents(path)
    for patch in spec.get("patches", []):
        assert set(patch) == {"target", "patch"}, "only inline JSON 6902 patches are rendered"
        targets = [doc for doc in docs if _matches(doc, patch["target"])]
        assert targets, f"{directory}: patch target {patch['target']} matches nothing"
        for doc in targets:
            for op in yaml.safe_load(patch["patch"]):
                _apply_op(doc, op)
    for image in spec.get("images", []):
        for container in (c for doc in docs for c in _containers(doc)):
            _set_image(container, image)
    if "namespace" in spec:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = spec["namespace"]
    return docs


def _matches(doc: dict, target: dict) -> bool:
    assert set(target) <= {"kind", "name", "labelSelector"}, f"render target {target} here"
    labels = doc["metadata"].get("labels", {})
    wanted = dict(term.split("=", 1) for term in target.get("labelSelector", "").split(",") if term)
    return (doc["kind"] == target.get("kind", doc["kind"])
            and doc["metadata"]["name"] == target.get("name", doc["metadata"]["name"])
            and all(labels.get(k) == v for k, v in wanted.items()))


def _apply_op(doc: dict, op: dict) -> None:
    """One JSON Patch (RFC 6902) add, remove or replace; a missing path raises, as in kustomize."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key = int(last) if isinstance(node, list) and last != "-" else last
    if op["op"] == "remove":
        del node[key]
    elif op["op"] == "replace":
        node[key]  # noqa: B018 (replace needs the path to exist)
        node[key] = op["value"]
    elif op["op"] == "add" and isinstance(node, list):
        node.insert(len(node) if key == "-" else key, op["value"])
    elif op["op"] == "add":
        node[key] = op["value"]
    else:
        raise AssertionError(f"render the {op['op']} operation here")


def _set_image(container: dict, image: dict) -> None:
    name, _, tag = container["image"].partition(":")
    if name == image["name"]:
        container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"


@functools.cache
def _rendered(name: str) -> tuple[dict, ...]:
    return tuple(render((DEPLOY / name).resolve()))


def rendered(name: str) -> list[dict]:
    """A kustomization's objects (a fresh copy, so a test cannot change another's)."""
    return copy.deepcopy(list(_rendered(name)))


def objects(name: str) -> list[dict]:
    """The objects of a kustomization directory, or of a manifest applied alone."""
    return rendered(name) if (DEPLOY / name).is_dir() else load_documents(DEPLOY / name)


# --- reading the objects ---------------------------------------------------------------------

def identity(doc: dict) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def one(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = find(docs, kind, name)
    return doc


def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(object name, pod template or Pod) of every object that runs pods."""
    return [(d["metadata"]["name"], d["spec"]["template"] if d["kind"] in WORKLOADS else d)
            for d in docs if d["kind"] in WORKLOADS | {"Pod"}]


def _containers(doc: dict) -> list[dict]:
    if doc["kind"] in WORKLOADS:
        return doc["spec"]["template"]["spec"]["containers"]
    return doc["spec"]["containers"] if doc["kind"] == "Pod" else []


def workers(docs: list[dict]) -> list[dict]:
    return [d for d in find(docs, "Deployment")
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]


def worker_model(deployment: dict) -> str:
    command = _containers(deployment)[0]["command"]
    assert command[:3] == ["dawet", "worker", "--model"], command
    return command[3]


def config(docs: list[dict]) -> dict[str, str]:
    return one(docs, "ConfigMap", "dawet-config")["data"]


def settings(docs: list[dict]) -> Settings:
    """The Settings every pod starts with: the ConfigMap's values over the defaults."""
    return Settings(**{key.removeprefix("DAWET_").lower(): value
                       for key, value in config(docs).items()})


def registry(docs: list[dict]) -> Registry:
    """The model registry as the pods load it, from the dawet-models ConfigMap."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "models.toml"
        path.write_text(one(docs, "ConfigMap", "dawet-models")["data"]["models.toml"])
        return load_registry(path)


def container_port(template: dict, port: int | str) -> int:
    """A probe's or Service's port, by number or by the container's port name."""
    ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"]
             for p in c.get("ports", [])}
    assert port in ports or port in ports.values(), f"no container port {port!r}"
    return ports.get(port, port)


def api_routes() -> set[str]:
    from flask import Flask

    from api import health, metrics

    app = Flask("routes")
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    return {rule.rule for rule in app.url_map.iter_rules()}


EVERYTHING = KUSTOMIZATIONS + [p.name for p in STANDALONE]
# The kustomizations that run Dawet, and those of them that scale it with KEDA.
WITH_DAWET = [n for n in KUSTOMIZATIONS if find(rendered(n), "ConfigMap", "dawet-config")]
WITH_KEDA = [n for n in WITH_DAWET if find(rendered(n), "ScaledObject")]


# --- every object, against its schema --------------------------------------------------------

CRD_MODELS = {"ScaledObject": ScaledObject, "TriggerAuthentication": TriggerAuthentication}


@functools.cache
def service_monitor_model():
    """Imported on first use: prometheus-operator's models take about two seconds to build."""
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    return ServiceMonitor


def validate_crd_object(doc: dict) -> None:
    """Against the CRD's OpenAPI schema as cloudcoil's pydantic models carry it; unknown
    fields are errors, as they are for the API server."""
    model = service_monitor_model() if doc["kind"] == "ServiceMonitor" else CRD_MODELS[doc["kind"]]
    model.model_validate(doc, extra="forbid")


def validate_object(doc: dict) -> None:
    if doc["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/")):
        validate_crd_object(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def schema_error(doc: dict) -> str | None:
    """Why the object fails its schema, in a line; None when it passes."""
    try:
        validate_object(doc)
    except kubernetes_validate.ValidationError as exc:  # its str() holds the whole schema
        return f"{'.'.join(map(str, exc.path))}: {exc.message}"
    except pydantic.ValidationError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("name", EVERYTHING)
def test_every_object_matches_its_schema(name):
    docs = objects(name)
    assert docs
    errors = {f"{d['kind']}/{d['metadata']['name']}": schema_error(d) for d in docs}
    assert {key: error for key, error in errors.items() if error} == {}


@pytest.mark.parametrize("mistake", [
    ("ScaledObject", ["spec", "scaleTargetRef"], "nmae"),
    ("ServiceMonitor", ["spec", "endpoints", 0], "prot"),
    ("Deployment", ["spec", "template", "spec"], "enableServiceLink"),
])
def test_a_misspelt_field_fails_validation(mistake):
    kind, path, field = mistake
    source = rendered("servicemonitor") if kind == "ServiceMonitor" else rendered(DEFAULT)
    doc = find(source, kind)[0]
    node = doc
    for part in path:
        node = node[part]
    node[field] = "x"
    assert field in schema_error(doc)


@pytest.mark.skipif(not shutil.which("kubectl"), reason="no kubectl to compare the rendering with")
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_rendering_here_is_kubectls(name):
    printed = subprocess.run(["kubectl", "kustomize", str(DEPLOY / name)], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    assert sorted(load_text(printed), key=identity) == sorted(rendered(name), key=identity)


def test_every_manifest_is_in_a_kustomization_or_applied_alone():
    listed = {(p.parent / entry).resolve()
              for p in DEPLOY.rglob("kustomization.yaml")
              for entry in yaml.safe_load(p.read_text()).get("resources", [])}
    manifests = {p.resolve() for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert manifests - listed == {p.resolve() for p in STANDALONE}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_a_kustomization_holds_each_object_once(name):
    keys = [identity(d) for d in rendered(name)]
    assert len(keys) == len(set(keys))


# --- settings --------------------------------------------------------------------------------

def test_the_configmap_holds_only_dawet_settings_with_valid_values():
    data = config(rendered(DEFAULT))
    fields = {f"DAWET_{name.upper()}" for name in Settings.model_fields}
    assert set(data) <= fields, f"not settings: {set(data) - fields}"
    settings(rendered(DEFAULT))  # raises on a value Settings refuses


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_dawet_variable_of_a_container_is_a_setting(name):
    fields = {f"DAWET_{field.upper()}" for field in Settings.model_fields}
    for doc in rendered(name):
        for container in _containers(doc):
            names = {e["name"] for e in container.get("env", [])}
            assert {n for n in names if n.startswith("DAWET_")} <= fields, doc["metadata"]["name"]


@pytest.mark.parametrize("name", EVERYTHING)
def test_service_links_are_off_in_every_pod(name):
    """A Service named dawet-api puts DAWET_API_PORT=tcp://... into every pod's environment."""
    for owner, template in pod_templates(objects(name)):
        assert template["spec"].get("enableServiceLinks") is False, owner


def test_secrets_the_pods_use_are_the_ones_the_docs_create():
    created = _secrets_created_in_docs()
    docs = rendered(DEFAULT)
    refs = [ref["secretKeyRef"] for _, t in pod_templates(docs) for c in t["spec"]["containers"]
            for ref in (e.get("valueFrom", {}) for e in c.get("env", [])) if "secretKeyRef" in ref]
    refs += [{"name": r["name"], "key": r["key"]} for auth in find(docs, "TriggerAuthentication")
             for r in auth["spec"]["secretTargetRef"]]
    assert refs
    for ref in refs:
        if ref.get("optional"):  # mentioned, not necessarily created
            assert f"--from-literal={ref['key']}=" in DOCS.read_text(), ref
        else:
            assert ref["key"] in created.get(ref["name"], {}), f"docs/kubernetes.md lacks {ref}"


def _secrets_created_in_docs() -> dict[str, dict[str, str]]:
    """{secret: {key: value}} of the first `kubectl create secret generic` of each Secret in
    docs/kubernetes.md (later ones are variants, such as an external Redis)."""
    text = DOCS.read_text().replace("\\\n", " ")
    secrets: dict[str, dict[str, str]] = {}
    for name, options in re.findall(r"create secret generic (\S+)([^\n]*)", text):
        secrets.setdefault(name, dict(re.findall(r"--from-literal=([\w-]+)=(\S+)", options)))
    return secrets


# --- the API ---------------------------------------------------------------------------------

def test_the_api_probes_readyz_and_healthz_on_its_port():
    docs = rendered(DEFAULT)
    template = one(docs, "Deployment", "dawet-api")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (ready["path"], live["path"]) == ("/readyz", "/healthz")
    assert {"/readyz", "/healthz", "/metrics"} <= api_routes()
    port = settings(docs).api_port
    assert container_port(template, ready["port"]) == container_port(template, live["port"]) == port


def test_the_api_service_reaches_the_api_port():
    docs = rendered(DEFAULT)
    template = one(docs, "Deployment", "dawet-api")["spec"]["template"]
    service = one(docs, "Service", "dawet-api")
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert container_port(template, port["targetPort"]) == settings(docs).api_port


def test_the_api_stops_within_its_grace_period():
    """Its preStop pause, then gunicorn's graceful timeout for open requests and streams."""
    docs = rendered(DEFAULT)
    spec = one(docs, "Deployment", "dawet-api")["spec"]["template"]["spec"]
    pause = int(spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
    argv = api_argv(settings(docs))
    graceful = int(argv[argv.index("--graceful-timeout") + 1])
    assert spec["terminationGracePeriodSeconds"] > pause + graceful


# --- the workers -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", WITH_DAWET)
def test_each_worker_serves_one_registered_model_under_its_name(name):
    docs = rendered(name)
    models = registry(docs)
    assert workers(docs)
    selectors = []
    for deployment in workers(docs):
        model = worker_model(deployment)
        assert models.get(model) is not None, f"{model} is not in models.toml"
        assert deployment["metadata"]["name"] == f"dawet-worker-{model}"
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector["dawet-model"] == model  # or two models' Deployments share pods
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        selectors.append(tuple(sorted(selector.items())))
    assert len(selectors) == len(set(selectors))


def test_gpu_workers_have_one_gpu_each_and_cpu_workers_none():
    for deployment in workers(rendered(DEFAULT)):
        (container,) = _containers(deployment)
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["command"][-2:] == ["--gpu", "0"]  # the pod's GPU is its device 0
    cpu = workers(rendered("overlays/cpu"))
    assert cpu
    for deployment in cpu:
        (container,) = _containers(deployment)
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert "--gpu" not in container["command"]
        assert "tolerations" not in deployment["spec"]["template"]["spec"]
        assert container["image"].startswith("dawet-worker-cpu:")


def test_the_worker_grace_period_outlasts_its_drain_bound():
    """SIGTERM drains the worker; a drain that stops progressing ends within the engine's
    stall limit plus the retries of a job's writes (the worker Deployment's comment)."""
    docs = rendered(DEFAULT)
    pods = settings(docs)
    bound = pods.engine_stall_seconds + pods.redis_retry_seconds
    for deployment in workers(docs):
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > bound


def test_worker_probes_and_annotations_hit_the_metrics_port():
    docs = rendered(DEFAULT)
    port = settings(docs).worker_metrics_port
    assert settings(docs).worker_metrics_host == "0.0.0.0"  # reachable from the kubelet
    for deployment in workers(docs):
        template = deployment["spec"]["template"]
        (container,) = template["spec"]["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] == "/metrics" and container_port(template, get["port"]) == port


def test_prometheus_annotations_name_a_metrics_port_of_the_pod():
    docs = rendered(DEFAULT)
    scraped = {}
    for owner, template in pod_templates(docs):
        notes = template["metadata"].get("annotations", {})
        if notes.get("prometheus.io/scrape") == "true":
            assert notes["prometheus.io/path"] == "/metrics"
            scraped[owner] = container_port(template, int(notes["prometheus.io/port"]))
    expected = {"dawet-api": settings(docs).api_port}
    expected |= {w["metadata"]["name"]: settings(docs).worker_metrics_port for w in workers(docs)}
    assert scraped == expected


def test_models_come_from_the_volume_and_the_registry_from_its_configmap():
    docs = rendered(DEFAULT)
    models_file = Path(config(docs)["DAWET_MODELS_FILE"])
    paths = [p for spec in registry(docs).entries for p in (spec.path, spec.adapter) if p]
    for owner, template in pod_templates(docs):
        if owner == "redis":
            continue  # the one pod that is not Dawet's
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["mountPath"]: m for c in template["spec"]["containers"]
                  for m in c.get("volumeMounts", [])}
        registry_mount = mounts[str(models_file.parent)]
        assert volumes[registry_mount["name"]]["configMap"]["name"] == "dawet-models"
        (mount,) = [m for m in mounts.values()
                    if volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName")
                    == "dawet-models"]
        assert mount["readOnly"] is True, owner
        assert all(p.startswith(mount["mountPath"] + "/") for p in paths), owner


# --- KEDA ------------------------------------------------------------------------------------

def interactive_list(queue: str) -> str:
    """The Redis list of a queue's interactive jobs: kombu appends a suffix per priority step."""
    step = PRIORITY_STEPS.index(LANE_PRIORITY[Lane.INTERACTIVE])
    return queue + KOMBU_REDIS_PRIORITY_SUFFIXES[step]


@pytest.mark.parametrize("name", WITH_KEDA)
def test_each_worker_deployment_scales_on_its_models_queue(name):
    docs = rendered(name)
    models = registry(docs)
    scalers = find(docs, "ScaledObject")
    targets = sorted(s["spec"]["scaleTargetRef"]["name"] for s in scalers)
    assert targets == sorted(w["metadata"]["name"] for w in workers(docs))
    auths = {a["metadata"]["name"] for a in find(docs, "TriggerAuthentication")}
    for scaler in scalers:
        ref = scaler["spec"]["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment"
        deployment = one(docs, "Deployment", ref["name"])
        assert "replicas" not in deployment["spec"]  # KEDA owns it; an apply would reset it
        (trigger,) = scaler["spec"]["triggers"]
        assert trigger["type"] == "redis" and trigger["authenticationRef"]["name"] in auths
        queue = models.get(worker_model(deployment)).queue
        assert trigger["metadata"]["listName"] == interactive_list(queue) == queue
        assert int(trigger["metadata"]["listLength"]) >= 1
        assert 1 <= scaler["spec"]["minReplicaCount"] <= scaler["spec"]["maxReplicaCount"]


def test_keda_reaches_the_in_cluster_redis_as_dawet_does():
    """KEDA's operator runs in its own namespace: the address is the Service's full name, and
    the database is DAWET_REDIS_URL's, as the docs create it."""
    docs = rendered(DEFAULT)
    service = one(docs, "Service", "redis")
    url = _secrets_created_in_docs()["dawet-redis"]["url"].strip("\"'")
    host, port, db = re.fullmatch(r"redis://:[^@]+@([\w.-]+):(\d+)/(\d+)", url).groups()
    assert (host, int(port)) == (service["metadata"]["name"], service["spec"]["ports"][0]["port"])
    for scaler in find(docs, "ScaledObject"):
        metadata = scaler["spec"]["triggers"][0]["metadata"]
        full_name = f"{host}.{service['metadata']['namespace']}.svc.cluster.local:{port}"
        assert metadata["address"] == full_name and metadata["databaseIndex"] == db


def test_the_external_redis_overlay_runs_no_redis_and_points_keda_elsewhere():
    docs = rendered("overlays/external-redis")
    assert not find(docs, "StatefulSet") and not find(docs, "Service", "redis")
    for scaler in find(docs, "ScaledObject"):
        assert ".svc.cluster.local" not in scaler["spec"]["triggers"][0]["metadata"]["address"]


# --- Redis -----------------------------------------------------------------------------------

def test_redis_keeps_an_append_only_file_on_its_volume():
    redis = one(rendered(DEFAULT), "StatefulSet", "redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert "$(REDIS_PASSWORD)" == args[args.index("--requirepass") + 1]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (mount,) = container["volumeMounts"]
    assert mount["name"] == claim["metadata"]["name"]
    assert mount["mountPath"] == args[args.index("--dir") + 1]
    assert redis["spec"]["serviceName"] == "redis"


# --- prometheus-operator ---------------------------------------------------------------------

def test_service_monitors_select_a_service_and_its_metrics_port():
    monitors = rendered("servicemonitor")
    docs = rendered(DEFAULT)
    metrics_port = {"dawet-api": settings(docs).api_port,
                    "dawet-worker": settings(docs).worker_metrics_port}
    assert {m["metadata"]["name"] for m in monitors} == set(metrics_port)
    for monitor in monitors:
        wanted = monitor["spec"]["selector"]["matchLabels"]
        (service,) = [s for s in find(docs, "Service")
                      if wanted.items() <= s["metadata"]["labels"].items()]
        # prometheus-operator's job label is the Service's name; monitoring/alerts.yml uses it.
        assert service["metadata"]["name"] == monitor["metadata"]["name"]
        assert service["metadata"]["namespace"] == monitor["metadata"]["namespace"]
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics" and endpoint["port"] in ports
            templates = [t for _, t in pod_templates(docs)
                         if service["spec"]["selector"].items() <= t["metadata"]["labels"].items()]
            assert templates
            for template in templates:
                port = container_port(template, ports[endpoint["port"]]["targetPort"])
                assert port == metrics_port[monitor["metadata"]["name"]]
