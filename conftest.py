"""Names every docstring example may use without importing them."""

import math

import numpy as np
import pytest
import torch

import curvops


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(math=math, np=np, torch=torch, curvops=curvops)
    torch.manual_seed(0)
