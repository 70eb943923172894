import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Triton reads this when it is first imported: run the fused kernels in its CPU interpreter
# (tests/test_kernels.py). On a GPU machine, CKPT_DOCTOR_GPU_TESTS=1 runs them compiled.
if not os.environ.get("CKPT_DOCTOR_GPU_TESTS"):
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def one_thread():
    """Tiny models: torch's intra-op threads only add contention on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
