#!/usr/bin/env bash
# The one command for a lent GPU machine, from the repository root:
#     OUT=/some/dir bash benchmarks/run_gpu.sh
# Its python3 has CUDA torch and Triton but no network, so this checkout is installed without
# dependencies (the GPU script needs none beyond torch and Triton), then the prepared script
# (benchmarks/attention_gpu.py) writes results.json, results.md and log.txt under $OUT.
set -euo pipefail
OUT=${OUT:-/tmp/attention_gpu}
mkdir -p "$OUT"
site=$(mktemp -d)
python3 -m pip install -q --no-deps --no-build-isolation --target "$site" . >"$OUT/install.txt" 2>&1 \
    || { cat "$OUT/install.txt"; exit 2; }
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
python3 benchmarks/attention_gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
