"""The Helm chart: `helm lint`, `helm template`, kubeconform against the Kubernetes schemas and
KEDA's ScaledObject schema (kubernetes-models), the scaling policies of pipeline/scaling.py,
and values that make no sense failing with a message. helm and kubeconform come from
``bash infra/tools/install.sh`` (make test runs it)."""

from __future__ import annotations

import importlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings
from pipeline.scaling import DEFAULT_POLICIES
from tests.paths import REPO_ROOT
from tests.unit.infra.k8s_schemas import schema_dir

CHART = REPO_ROOT / "infra" / "helm" / "sluice"
TOOLS = Path.home() / ".cache" / "sluice" / "bin"  # where infra/tools/install.sh builds them
VALIDATE = REPO_ROOT / "infra" / "k8s" / "validate"
EVERYTHING = [  # every optional path of the templates at once
    "--set", "stages.compute.gpu=true",
    "--set", "stages.compute.model.persistentVolumeClaim=models",
    "--set", "stages.compute.model.path=/models/qwen2-fp16",
    "--set", "stages.preprocess.exactlyOnce=true",
    "--set", "stages.postprocess.exactlyOnce=true",
    "--set", "serviceMonitor.enabled=true",
    "--set", "secretName=sluice",
    "--set", "settings.archive_url=s3://sluice-archive/log",
]  # fmt: skip


def tool(name: str) -> str:
    path = TOOLS / name
    assert path.is_file(), f"{name} is missing: bash infra/tools/install.sh"
    return str(path)


def helm(*args: str, release: str = "sluice") -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("helm"), "template", release, str(CHART), *args],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def render(*args: str, release: str = "sluice") -> list[dict[str, Any]]:
    done = helm(*args, release=release)
    assert done.returncode == 0, done.stderr
    docs = importlib.import_module("yaml").safe_load_all(done.stdout)
    return [d for d in docs if d]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_helm_lint_passes_with_defaults_and_with_every_option() -> None:
    for args in ([], EVERYTHING):
        done = subprocess.run([tool("helm"), "lint", "--strict", str(CHART), *args],
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("args", [[], EVERYTHING], ids=["defaults", "everything"])
def test_rendered_manifests_pass_kubeconform_and_the_keda_schema(
    args: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "sluice.yaml"
    out.write_text(helm(*args).stdout)
    location = str(schema_dir()) + "/{{ .ResourceKind }}{{ .KindSuffix }}.json"
    done = subprocess.run(
        [tool("kubeconform"), "-strict", "-summary", "-skip", "ScaledObject,ServiceMonitor",
         "-schema-location", location, str(out)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Invalid: 0, Errors: 0" in done.stdout
    scaled = [d for d in render(*args) if d["kind"] == "ScaledObject"]
    assert len(scaled) == 3
    (tmp_path / "keda.yaml").write_text("".join(f"---\n{json.dumps(d)}\n" for d in scaled))
    assert (VALIDATE / "node_modules").is_dir(), "run: npm ci --prefix infra/k8s/validate"
    checked = subprocess.run(["node", "validate.mjs", str(tmp_path / "keda.yaml")], cwd=VALIDATE,
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert checked.returncode == 0 and "3 checked, 0 failed" in checked.stdout, checked.stdout


def test_kubeconform_catches_a_wrong_type(tmp_path: Path) -> None:
    out = tmp_path / "broken.yaml"
    out.write_text(helm().stdout.replace("runAsNonRoot: true", 'runAsNonRoot: "yes"', 1))
    location = str(schema_dir()) + "/{{ .ResourceKind }}{{ .KindSuffix }}.json"
    done = subprocess.run([tool("kubeconform"), "-strict", "-skip", "ScaledObject",
                           "-schema-location", location, str(out)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 1 and "runAsNonRoot" in done.stdout, done.stdout


def test_scaled_objects_carry_the_scaling_policies() -> None:
    docs = render()
    for policy in DEFAULT_POLICIES:
        spec = find(docs, "ScaledObject", f"sluice-{policy.stage}")["spec"]
        kafka = spec["triggers"][0]
        assert kafka["type"] == "kafka"
        assert kafka["metadata"]["lagThreshold"] == str(policy.lag_per_worker)
        assert kafka["metadata"]["consumerGroup"] == Settings().group_id(policy.stage)
        assert spec["minReplicaCount"] == policy.min_workers
        assert spec["maxReplicaCount"] == policy.max_workers
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] == policy.scale_up_window_s
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] == policy.scale_down_window_s
        lanes = [t["metadata"] for t in spec["triggers"] if t["type"] == "kafka"][1:]
        if policy.batch_lag_threshold:  # the batch lane: its own trigger, the same group
            assert [(m["topic"], m["lagThreshold"], m["consumerGroup"]) for m in lanes] == [
                (f"{kafka['metadata']['topic']}.batch", str(policy.batch_lag_threshold),
                 kafka["metadata"]["consumerGroup"])
            ]  # fmt: skip
            assert lanes[0]["activationLagThreshold"] == str(policy.activation_lag)
        else:
            assert lanes == []
        tokens = [t for t in spec["triggers"] if t["type"] == "prometheus"]
        if policy.token_threshold:
            assert tokens[0]["metadata"]["threshold"] == str(policy.token_threshold)
            assert "sluice_compute_pending_tokens" in tokens[0]["metadata"]["query"]
            assert tokens[0]["metadata"]["activationThreshold"] == "1"
        else:
            assert tokens == []


def test_a_gpu_compute_gets_the_gpu_the_cuda_image_a_startup_probe_and_its_model() -> None:
    docs = render(*EVERYTHING)
    pod = find(docs, "Deployment", "sluice-compute")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == "sluice:cuda"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        pod["tolerations"]
    )
    probe = container["startupProbe"]
    assert probe["httpGet"]["path"] == "/healthz"
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 900
    assert env_of(container)["SLUICE_MODEL_PATH"] == "/models/qwen2-fp16"
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in (
        container["volumeMounts"]
    )
    preprocess = find(docs, "StatefulSet", "sluice-preprocess")["spec"]["template"]["spec"]
    assert preprocess["containers"][0]["image"] == "sluice:cpu"


def test_exactly_once_stages_are_stateful_sets_named_by_pod() -> None:
    docs = render(*EVERYTHING)
    sts = find(docs, "StatefulSet", "sluice-preprocess")
    assert sts["spec"]["serviceName"] == "sluice-preprocess"
    env = env_of(sts["spec"]["template"]["spec"]["containers"][0])
    assert env["SLUICE_EXACTLY_ONCE"] == "true"
    assert env["SLUICE_INSTANCE_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    target = find(docs, "ScaledObject", "sluice-preprocess")["spec"]["scaleTargetRef"]
    assert target["kind"] == "StatefulSet"
    assert not [d for d in docs if d["kind"] == "Deployment" and "preprocess" in str(d)]


def test_every_service_has_a_pdb_and_the_gateway_a_service() -> None:
    docs = render()
    for name in ("preprocess", "compute", "postprocess", "archiver", "batcher", "gateway"):
        assert find(docs, "PodDisruptionBudget", f"sluice-{name}")
    gateway = find(docs, "Service", "sluice-gateway")
    assert gateway["spec"]["ports"][0]["port"] == 8000


def test_the_batcher_runs_like_the_archiver_one_replica_without_keda() -> None:
    docs = render()
    batcher = find(docs, "Deployment", "sluice-batcher")
    assert batcher["spec"]["replicas"] == 1
    (container,) = batcher["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["sluice", "run", "batcher"]
    assert not [d for d in docs if d["kind"] == "ScaledObject" and "batcher" in str(d)]


def test_two_releases_differ_by_group_suffix() -> None:
    green = render("--set", "groupSuffix=green", release="sluice-green")
    config = find(green, "ConfigMap", "sluice-green-settings")["data"]
    assert config["SLUICE_GROUP_SUFFIX"] == "green"
    settings = Settings(group_suffix="green")
    group = find(green, "ScaledObject", "sluice-green-compute")["spec"]["triggers"][0]
    assert group["metadata"]["consumerGroup"] == settings.group_id("compute")
    known = {f"SLUICE_{name.upper()}" for name in Settings.model_fields}
    assert set(config) <= known, sorted(set(config) - known)


def test_a_paused_release_runs_no_stage_until_keda_is_unpaused() -> None:
    docs = render("--set", "paused=true", "--set", "groupSuffix=green", release="sluice-green")
    for stage in ("preprocess", "compute", "postprocess", "archiver", "batcher"):
        assert find(docs, "Deployment", f"sluice-green-{stage}")["spec"]["replicas"] == 0
    for stage in ("preprocess", "compute", "postprocess"):
        scaled = find(docs, "ScaledObject", f"sluice-green-{stage}")["metadata"]
        assert scaled["annotations"]["autoscaling.keda.sh/paused-replicas"] == "0"
    assert "annotations" not in find(render(), "ScaledObject", "sluice-compute")["metadata"]


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "stages.compute.gpu=true", "--set", "stages.compute.gpuCount=0"],
     "stages.compute.gpu is true but stages.compute.gpuCount is 0"),
    (["--set", "stages.compute.keda.minReplicas=4", "--set", "stages.compute.keda.maxReplicas=2"],
     "stages.compute.keda: minReplicas 4 is more than maxReplicas 2"),
    (["--set", "kafka.bootstrapServers="], "kafka.bootstrapServers is required"),
])  # fmt: skip
def test_values_that_make_no_sense_fail_with_a_message(args: list[str], message: str) -> None:
    done = helm(*args)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
