#!/usr/bin/env bash
# The one command for a lent GPU machine, from the repository root (at most 7.7 minutes: the
# three steps' time limits; about 6 expected on an H200):
#     OUT=/some/dir bash benchmarks/run_gpu.sh
# Its python3 has CUDA torch and Triton but no network and maybe no wheel builder, so the
# package is laid out as a wheel installs it (kernels/ as ckpt_doctor/kernels, pyproject's
# package-dir mapping) in a temporary folder put on PYTHONPATH. Then, every step with a time
# limit of its own and its failure reported without stopping the others:
#   1. the kernel tests, compiled on the GPU (CKPT_DOCTOR_GPU_TESTS=1; bf16 added);
#   2. benchmarks/attention_gpu.py: correctness, kernels eager and in CUDA graphs, end-to-end
#      decode against HF + PEFT, a profile, the fixture world (results.json, results.md);
#   3. benchmarks/time_to_verdict.py: smoke-generate (32 prompts x 128 tokens) and diagnose
#      on a 7B-shaped model as fresh CLI processes, with their timings (verdict.json).
# Everything lands under $OUT with log.txt. Arguments go to attention_gpu.py; --dry-run checks
# the whole path on a CPU machine at toy shapes (tests/test_kernels.py does).
set -uo pipefail
OUT=${OUT:-/tmp/attention_gpu}
DRY=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY=1; done
mkdir -p "$OUT"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
cp -r ckpt_doctor "$site/"
cp -r kernels "$site/ckpt_doctor/kernels"
# The tests import from the repository root they sit in (conftest.py): a copy beside the
# laid-out package, so that they see ckpt_doctor.kernels.
cp -r tests fixtures pyproject.toml "$site/"
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
{
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton',
        triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else
        'no CUDA device')"
    python3 -c "import importlib.util as u; print('modules:', ', '.join(f'{m} ' +
        ('yes' if u.find_spec(m) else 'MISSING') for m in ('typer', 'rich', 'safetensors',
        'sentencepiece', 'pytest', 'transformers', 'peft')))"
    echo "== 1. kernel tests, compiled =="
    if [ "$DRY" = 1 ]; then
        echo "dry run: skipped (the test suite runs them in the interpreter)"
    elif python3 -c "import pytest" 2>/dev/null; then
        (cd "$site" && CKPT_DOCTOR_GPU_TESTS=1 timeout 120 python3 -m pytest -q -p no:cacheprovider \
            tests/test_kernels.py tests/test_fused_ops.py -k "not ahead_of_time_compile" \
            --junitxml "$OUT/kernel_tests.xml") || echo "kernel tests: exit $?"
    else
        echo "pytest is not installed: kernel tests not run"
    fi
    echo "== 2. kernels, decode, fixture world =="
    timeout 210 python3 benchmarks/attention_gpu.py --steps 64 --out "$OUT" "$@" \
        || echo "attention_gpu.py: exit $?"
    echo "== 3. time to verdict =="
    if [ "$DRY" = 1 ]; then
        timeout 300 python3 benchmarks/time_to_verdict.py --device cpu --n-layers 1 --dim 256 \
            --prompts 2 --max-new-tokens 4 --repeats 1 --sides product \
            --workdir "$site/verdict" --out "$OUT/verdict.json" || echo "time_to_verdict: exit $?"
    else
        timeout 130 python3 benchmarks/time_to_verdict.py --device cuda --n-layers 32 \
            --prompts 32 --max-new-tokens 128 --repeats 1 --sides product \
            --workdir /tmp/ckpt-doctor-verdict --out "$OUT/verdict.json" \
            || echo "time_to_verdict: exit $?"
    fi
} 2>&1 | tee "$OUT/log.txt"
