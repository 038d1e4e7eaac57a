"""monitoring/: a real Prometheus scrapes the test stack with the committed rules; every dashboard
query and alert expression is valid, and the key ones have data."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
import yaml

from conftest import ROOT, stream_events, submit, wait_until
from dawet.processes import Stack, free_port

MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana/dashboards/dawet.json"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL),
    reason="needs Debian's prometheus package (prometheus, promtool); .ci/run installs it")
# Panels that stay empty on this stack: no CUDA, an engine without KV-cache stats, no 5xx.
MAY_BE_EMPTY = {"KV-cache use", "GPU memory allocated", "API 5xx per second", "Job error ratio"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target, with Grafana's variables filled in."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel["title"], target["expr"].replace("$__rate_interval", "1m")
             .replace("$model", ".*"))
            for panel in panels for target in panel.get("targets", [])]


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@needs_prometheus
@pytest.mark.parametrize("check,path", [("config", "prometheus.yml"), ("rules", "alerts.yml")])
def test_promtool_accepts_the_committed_files(check, path):
    result = subprocess.run([PROMTOOL, "check", check, str(MONITORING / path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_panel_has_a_query_on_the_provisioned_datasource():
    uid = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml")
                         .read_text())["datasources"][0]["uid"]
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]
    assert panels and all(p["targets"] and p["datasource"]["uid"] == uid for p in panels)


def prometheus_config(stack: Stack, port: int) -> dict:
    """The committed prometheus.yml with the test stack's ports as static targets, 1 s scrapes."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(MONITORING / "alerts.yml")]
    targets = {"dawet-api": [stack.api_url.removeprefix("http://")],
               "dawet-worker": [f"127.0.0.1:{p}" for p in stack.worker_metrics_ports],
               "prometheus": [f"127.0.0.1:{port}"]}
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return config


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory) -> Iterator[str]:
    """A Prometheus server scraping the test stack; yields its base URL."""
    if not PROMETHEUS:
        pytest.skip("needs Debian's prometheus package; .ci/run installs it")
    workdir, port = tmp_path_factory.mktemp("prometheus"), free_port()
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(stack, port)))
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}",
         f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _get(f"{url}/-/ready") is not None, 30, "Prometheus to start", 0.5)
        yield url
    finally:
        process.terminate()
        process.wait(20)
        log.close()


def _get(url: str, **params) -> dict | None:
    try:
        response = httpx.get(url, params=params, timeout=10)
    except httpx.HTTPError:
        return None
    return response.json() if response.headers.get("content-type", "").startswith(
        "application/json") else ({} if response.status_code == 200 else None)


def query(url: str, expr: str) -> dict:
    """Run an instant query; the whole API answer (status, data or error)."""
    return httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()


@pytest.fixture(scope="module")
def scraped(prometheus: str, stack: Stack) -> str:
    """Run jobs (and refuse one), then wait until Prometheus has scraped their effects."""
    with httpx.Client(base_url=stack.api_url, timeout=30) as client:
        for prompt in ("Saya suka makan", "The weather today is"):
            assert stream_events(submit(client, prompt=prompt, max_new_tokens=8)["stream_url"])
        assert client.post("/v1/generate", content=b"{").status_code == 400
    wait_until(lambda: query(prometheus, "sum(dawet_job_time_to_first_token_seconds_count) >= 2")
               ["data"]["result"], 30, "Prometheus to scrape the finished jobs", 0.5)
    time.sleep(2)  # a second scrape, so rates over the window have two points
    return prometheus


@needs_prometheus
@pytest.mark.e2e
@pytest.mark.parametrize("title,expr", dashboard_queries())
def test_dashboard_queries_are_valid_and_the_key_ones_have_data(scraped, title, expr):
    answer = query(scraped, expr)
    assert answer["status"] == "success", answer
    if title not in MAY_BE_EMPTY:
        assert answer["data"]["result"], f"{title}: no data for {expr}"


@needs_prometheus
@pytest.mark.e2e
@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_expressions_are_valid(scraped, rule):
    assert query(scraped, rule["expr"])["status"] == "success"


@needs_prometheus
@pytest.mark.e2e
def test_the_rules_evaluate_and_flag_a_model_without_workers(scraped):
    wait_until(lambda: not any(r["lastEvaluation"].startswith("0001") for r in _rules(scraped)),
               15, "every rule to be evaluated", 0.5)  # 0001-01-01: not evaluated yet
    assert {r["name"]: r["health"] for r in _rules(scraped)} == {
        rule["alert"]: "ok" for rule in alert_rules()}
    alerts = _get(f"{scraped}/api/v1/alerts")["data"]["alerts"]
    unserved = {a["labels"]["model"] for a in alerts if a["labels"]["alertname"] == "DawetNoLiveWorker"}
    assert "dawet-bench-4m" in unserved and "dawet-tiny" not in unserved  # DEMO_MODEL's base
    assert query(scraped, 'up{job="dawet-worker"} == 1')["data"]["result"]


def _rules(url: str) -> list[dict]:
    return [rule for group in _get(f"{url}/api/v1/rules")["data"]["groups"]
            for rule in group["rules"]]
