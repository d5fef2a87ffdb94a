"""The Kubernetes manifests are generated from the autoscaler's policies and kept in step."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from infra.k8s.render import render
from pipeline.scaling import DEFAULT_POLICIES
from tests.paths import REPO_ROOT


def _docs() -> list[dict[str, Any]]:
    text = (REPO_ROOT / "infra" / "k8s" / "sluice.yaml").read_text()
    return [json.loads(part) for part in text.split("---\n")[1:]]


def test_committed_manifests_are_what_the_policies_generate() -> None:
    committed = (REPO_ROOT / "infra" / "k8s" / "sluice.yaml").read_text()
    assert committed == render(), "regenerate: python -m infra.k8s.render > infra/k8s/sluice.yaml"


def test_scaled_objects_carry_the_same_thresholds_min_max_and_windows() -> None:
    objects = {d["metadata"]["name"]: d for d in _docs() if d["kind"] == "ScaledObject"}
    for policy in DEFAULT_POLICIES:
        spec = objects[f"sluice-{policy.stage}"]["spec"]
        trigger = spec["triggers"][0]
        assert trigger["type"] == "kafka"
        assert trigger["metadata"]["lagThreshold"] == str(policy.lag_per_worker)
        assert trigger["metadata"]["consumerGroup"] == f"sluice-{policy.stage}"
        assert spec["minReplicaCount"] == policy.min_workers
        assert spec["maxReplicaCount"] == policy.max_workers
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] == policy.scale_up_window_s
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] == policy.scale_down_window_s
        assert spec["scaleTargetRef"]["name"] == f"sluice-{policy.stage}"


def _validate(path: str) -> subprocess.CompletedProcess[str]:
    folder = REPO_ROOT / "infra" / "k8s" / "validate"
    assert (folder / "node_modules").is_dir(), "run: npm ci --prefix infra/k8s/validate"
    return subprocess.run(["node", "validate.mjs", path], cwd=folder, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


@pytest.mark.tools
def test_manifests_pass_the_kubernetes_and_keda_crd_schemas() -> None:
    done = _validate(str(REPO_ROOT / "infra" / "k8s" / "sluice.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 checked, 0 failed" in done.stdout


@pytest.mark.tools
def test_the_schema_check_catches_a_broken_scaled_object(tmp_path: Path) -> None:
    broken = render().replace('"minReplicaCount": 1', '"minReplicaCount": "one"', 1)
    (tmp_path / "broken.yaml").write_text(broken)
    done = _validate(str(tmp_path / "broken.yaml"))
    assert done.returncode == 1 and "1 failed" in done.stdout, done.stdout
