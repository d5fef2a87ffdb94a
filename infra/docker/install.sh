#!/usr/bin/env bash
# Install Sluice into a fresh virtual environment: the one install step of both images, and
# what CI runs in a fresh venv to prove the images' install works without a container engine.
#
#   bash infra/docker/install.sh VENV cpu|cuda [SOURCE]
#
# VENV is created (it must not exist yet); SOURCE is the repository (default: the one this
# script is in). Dependencies are pinned by infra/docker/constraints.txt. The check at the end
# imports every serving module and, for cpu, loads the demo model's provider report, so a broken
# install fails here and not at the first prompt.
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: install.sh VENV cpu|cuda [SOURCE]" >&2
  exit 2
fi
venv=$1
extra=$2
src="${3:-$(cd "$(dirname "$0")/../.." && pwd)}"
case "$extra" in
  cpu|cuda) ;;
  *) echo "install.sh: the extra is cpu or cuda, not '$extra'" >&2; exit 2 ;;
esac
if [ -e "$venv" ]; then
  echo "install.sh: $venv exists; give a new folder" >&2
  exit 2
fi
if [ ! -f "$src/pyproject.toml" ]; then
  echo "install.sh: $src has no pyproject.toml: not a Sluice checkout" >&2
  exit 2
fi

"${PYTHON:-python3}" -m venv "$venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"$venv/bin/pip" install -q -c "$src/infra/docker/constraints.txt" "$src[$extra]"

# The smoke check: the command, every service module, and the engine the extra chose.
"$venv/bin/sluice" --help >/dev/null
"$venv/bin/python" - "$extra" <<'PYEOF'
import importlib, sys
from importlib import metadata
for module in ("stages.preprocess", "stages.compute", "stages.postprocess", "stages.gateway",
               "stages.archiver", "sluice.lag", "sluice.cli.main"):
    importlib.import_module(module)
extra = sys.argv[1]
engine = {"cpu": "onnxruntime-genai", "cuda": "onnxruntime-genai-cuda"}[extra]
print(f"installed sluice-llm {metadata.version('sluice-llm')} with {engine} "
      f"{metadata.version(engine)}")
if extra == "cpu":  # a GPU is not needed to build the CUDA image, so only cpu loads a model
    from pipeline.config import DEFAULT_MODEL
    from stages.engines.providers import check_providers
    print(check_providers(DEFAULT_MODEL).describe())
PYEOF
