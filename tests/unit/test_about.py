"""build_info() reports what was compiled, truthfully and in plain types."""

import importlib.util
import os

import pytest
import torch

import parallelkit
from parallelkit.about import build_info, format_build_info

EXPECTED_TYPES = {
    "parallelkit_version": str,
    "torch_version": str,
    "torch_cuda_version": (str, type(None)),
    "cuda_compiled": bool,
    "cuda_arches": list,
    "cuda_available": bool,
    "triton_available": bool,
    "triton_version": (str, type(None)),
}


def test_keys_and_types():
    info = build_info()
    assert set(info) == set(EXPECTED_TYPES)
    for key, expected in EXPECTED_TYPES.items():
        assert isinstance(info[key], expected), (key, info[key])
    assert all(isinstance(arch, str) for arch in info["cuda_arches"])


def test_versions_are_the_running_ones():
    info = build_info()
    assert info["parallelkit_version"] == parallelkit.__version__
    assert info["torch_version"] == torch.__version__
    assert info["torch_cuda_version"] == torch.version.cuda
    assert info["cuda_available"] == torch.cuda.is_available()


def test_arches_listed_exactly_when_cuda_compiled():
    info = build_info()
    assert bool(info["cuda_arches"]) == info["cuda_compiled"]


@pytest.mark.skipif(
    os.environ.get("PARALLELKIT_EXPECT_CUDA_BUILD") != "1",
    reason="set PARALLELKIT_EXPECT_CUDA_BUILD=1 after a CUDA build (TORCH_CUDA_ARCH_LIST=9.0)",
)
def test_cuda_build_is_what_ci_asked_for():
    info = build_info()
    assert info["cuda_compiled"] is True
    assert "9.0" in info["cuda_arches"]


def test_triton_detection_matches_importlib():
    info = build_info()
    assert info["triton_available"] == (importlib.util.find_spec("triton") is not None)
    assert (info["triton_version"] is None) == (not info["triton_available"])


def test_format_names_every_key():
    text = format_build_info()
    assert all(key in text for key in EXPECTED_TYPES)
