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
