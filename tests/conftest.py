"""Shared tiny models (random weights, ``pretrained=False``) for the fast suite."""
from __future__ import annotations

import contextlib
import functools
import os

import pytest
import timm
import torch

import funcam
from funcam._src.core import methods
from funcam._src.core.lrp import as_method

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The README's test command runs one pytest-xdist worker per core: one intra-op thread each, so that two
    # workers do not fight over the same two cores (tests that measure threads set their own count).
    torch.set_num_threads(1)

# name -> (timm kwargs, input size (H, W)); sizes are the smallest each family accepts cheaply.
FAMILIES = {
    "resnet18": ({}, (64, 64)),
    "convnext_atto": ({}, (64, 64)),
    "tf_efficientnet_lite0": ({}, (64, 64)),
    "regnetx_002": ({}, (64, 64)),
    "mobilenetv3_small_050": ({}, (64, 64)),
    "vgg11": ({}, (64, 64)),
    "densenet121": ({}, (64, 64)),
    "vit_tiny_patch16_224": ({"img_size": 64}, (64, 64)),  # CLS-token pooled
    "vit_tiny_patch16_224-avg": ({"img_size": (48, 80), "global_pool": "avg"}, (48, 80)),  # non-square 3x5
    "deit_tiny_distilled_patch16_224": ({"img_size": 64}, (64, 64)),
    "vit_small_patch14_reg4_dinov2": ({"img_size": 56}, (56, 56)),  # 4 registers + CLS
    "swin_tiny_patch4_window7_224": ({}, (224, 224)),
}

# Narrowed variants for the tests of one route: made by make_model / make_input, but not in the ``family`` fixture.
VARIANTS = {
    # timm's Swin v1 at C = 32 in the last stage (8x8 tokens, 4x4 shifted windows in both stages)
    "swin_tiny_patch4_window7_224-narrow": ({"img_size": 64, "embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2),
                                            "window_size": 4}, (64, 64)),
}


@functools.lru_cache(maxsize=None)
def make_model(name: str, num_classes: int = 10, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    kwargs, _ = {**FAMILIES, **VARIANTS}[name]
    torch.manual_seed(0)
    model = timm.create_model(name.split("-")[0], pretrained=False, num_classes=num_classes, **kwargs)
    return model.to(dtype).eval()


def noised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every all-zero floating parameter with small noise: zero-initialised heads, layer scales and post-norms
    would make a zero map the weights' doing, not funcam's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and not bool(p.any()):
                p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def quick_options(method: str) -> dict:
    """Options for the tests that run every method of the table: the methods whose cost is num_samples x C masked
    forwards (SS-CAM, IS-CAM) run one set of C forwards there (their samples are tested in
    tests/core/test_perturbation.py); the methods that draw noise (SS-CAM, SmoothGrad, VarGrad, GradientShap) draw it
    from a generator seeded anew for each call, so that two calls agree and the global random state is untouched."""
    name = method.replace("-", "_")
    opts = {"sscam": {"num_samples": 1}, "iscam": {"num_samples": 1}}.get(name, {})
    if any(o.name == "generator" for o in methods.get(name).options):
        opts["generator"] = torch.Generator().manual_seed(0)
    return opts


def make_input(name: str, batch: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    h, w = {**FAMILIES, **VARIANTS}[name][1]
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@contextlib.contextmanager
def record_vmap_chunks(monkeypatch):
    """Records the ``chunk_size`` of every ``torch.func.vmap`` made inside the block (the engine's chunking)."""
    seen: list = []
    real = torch.func.vmap

    def spy(fn, *args, chunk_size=None, **kwargs):
        seen.append(chunk_size)
        return real(fn, *args, chunk_size=chunk_size, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch.func, "vmap", spy)
        yield seen


class FullDisk:
    """A file opened for writing on a full disk: the first 10 bytes of a write land, then ENOSPC with no file
    name (as a write or close fails there)."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        import errno

        self.f.write(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is as fast and avoids OpenMP's stalls when other processes hold the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


# Hypothesis: "ci" (the default) is deterministic and small, so CI is reproducible and quick; "long" explores.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=300, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(__import__("os").environ.get("HYPOTHESIS_PROFILE", "ci"))


def lrp(model, x, classes=None, rule: str = "attnlrp", **kw):
    """``funcam.cam`` with the LRP rule set named ``rule`` (attnlrp, cplrp or a zennit composite): the CAM."""
    method, options = as_method(rule)
    return funcam.cam(model, x, classes, method=method, **options, **kw)
