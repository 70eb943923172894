"""Where the kernel tests run and on what: compiled on CUDA when conftest left Triton's
interpreter off for a GPU run (CKPT_DOCTOR_GPU_TESTS=1), else in the interpreter (fp32 and fp16
only: bf16 is wrong there)."""

from __future__ import annotations

import pytest
import torch
from ckpt_doctor.kernels import interpreting, triton_problem

GPU = not interpreting() and torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
MARKS = [
    pytest.mark.skipif(
        not (GPU or interpreting()),
        reason="needs Triton's interpreter (TRITON_INTERPRET=1) or CKPT_DOCTOR_GPU_TESTS=1 on CUDA",
    ),
    pytest.mark.skipif(triton_problem() is not None, reason=str(triton_problem())),
]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])
DTYPE_IDS = ["fp32", "fp16"] + (["bf16"] if GPU else [])
