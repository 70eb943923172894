import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _gpu_tests() -> bool:
    """CKPT_DOCTOR_GPU_TESTS=1 on a machine with CUDA: the kernel tests run compiled there."""
    if os.environ.get("CKPT_DOCTOR_GPU_TESTS", "") in ("", "0"):
        return False
    import torch

    return torch.cuda.is_available()


# Triton reads this when the kernels are first defined: run them in its CPU interpreter
# (tests/test_kernels.py), unless they run compiled on a GPU.
if not _gpu_tests():
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)


@pytest.fixture
def one_thread():
    """Tiny models: torch's intra-op threads only add contention on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
