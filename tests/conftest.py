"""Shared fixtures; the builders live in helpers.py."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from helpers import make_images, write_tiny_flux  # noqa: E402


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> dict:
    return write_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory) -> dict:
    return write_tiny_flux(tmp_path_factory.mktemp("tiny_flux_schnell"), guidance=False, seed=5)


@pytest.fixture()
def images(tmp_path):
    return make_images(tmp_path / "data")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster, and on a shared CPU OpenMP workers spinning against other processes slow
    each small op by orders of magnitude (measured: 35 ms vs 4 s per SDXL UNet forward). Set for a module that asks
    (`pytestmark = pytest.mark.usefixtures("one_thread")`), restored after it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
