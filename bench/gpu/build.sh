#!/usr/bin/env bash
# On the GPU host, after install.sh: the Qwen2-1.5B-shaped HF model (random weights) and the
# builds bench/gpu_pipeline.py compares: `sluice model build`'s CUDA fp16 default (paged
# attention, 128 sequences) and the same with max_batch_size 256 and 512 (the KV cache grows
# with it: num_blocks holds max_batch_size sequences of 4,096 tokens).
#
#   bash bench/gpu/build.sh [WORK]        (WORK defaults to /tmp/gpu)
set -euo pipefail
work=${1:-/tmp/gpu}
mkdir -p "$work"
[[ -f $work/hf/config.json ]] || python3 -c "
from pathlib import Path
from bench.gpu_build import make_hf
make_hf(Path('$work/hf'))"
build() {
  [[ -f $work/$1/genai_config.json ]] && return 0
  python3 -m sluice.cli.main model build --from "$work/hf" --out "$work/$1" \
    --precision fp16 --device cuda "${@:2}" > "$work/build-$1.log" 2>&1 \
    || { echo "build $1 failed:"; tail -20 "$work/build-$1.log"; return 1; }
  echo "built $1"
}
build fp16-sluice &
build fp16-b256 --extra-option max_batch_size=256 &
build fp16-b512 --extra-option max_batch_size=512 &
wait
