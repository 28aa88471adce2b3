import os
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile("curvops", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("curvops")

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])])
def device(request) -> torch.device:
    """Every device test runs on the CPU, and on a GPU where there is one."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def ranks():
    """Two gloo processes on 127.0.0.1 that run test functions (:class:`distributed.RankPool`)."""
    from distributed import RankPool

    pool = RankPool()
    yield pool
    pool.close()
