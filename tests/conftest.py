import pytest
import torch

import walt_export


@pytest.fixture(scope="session")
def micro():
    """The unit-test cascade, seeded; tests must not modify it."""
    return walt_export.build("micro", seed=0)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)
