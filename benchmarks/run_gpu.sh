#!/usr/bin/env bash
# The one command for a lent GPU machine, from the repository root:
#     OUT=/some/dir bash benchmarks/run_gpu.sh
# Its python3 has CUDA torch and Triton but no network and maybe no wheel builder, so the
# package is laid out as a wheel installs it (kernels/ as ckpt_doctor/kernels, pyproject's
# package-dir mapping) in a temporary folder put on PYTHONPATH; the prepared script
# (benchmarks/attention_gpu.py) writes results.json, results.md and log.txt under $OUT.
# Arguments go to that script (--dry-run checks the whole path on a CPU machine).
set -euo pipefail
OUT=${OUT:-/tmp/attention_gpu}
mkdir -p "$OUT"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
cp -r ckpt_doctor "$site/"
cp -r kernels "$site/ckpt_doctor/kernels"
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
{
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton',
        triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else
        'no CUDA device')"
    python3 benchmarks/attention_gpu.py --out "$OUT" "$@"
} 2>&1 | tee "$OUT/log.txt"
