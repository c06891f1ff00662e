from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# spill files of sinks that fail in tests go to a temporary folder, never into the checkout
os.environ.setdefault("STABWATCH_SPILL_DIR", tempfile.mkdtemp(prefix="stabwatch-spill-"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is several times faster than two on a loaded 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
