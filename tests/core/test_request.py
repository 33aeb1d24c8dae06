"""The per-call request (funcam/_src/core/request.py): every argument checked once, before any forward, with a
message naming the argument, the value and what was expected; the same request explains the same classes whatever
the entry point."""
from __future__ import annotations

import pytest
import torch

import funcam
from funcam._src.core import request
from funcam._src.core.request import Option, Request, parse, resolve
from tests.conftest import make_input, make_model

OPTS = (Option("n_steps", 50, request.positive_int("n_steps"), "steps", int),
        Option("integration", "gausslegendre", request.one_of("integration", ("gausslegendre", "riemann_left")),
               "rule", str))


def test_defaults_are_filled_and_given_options_checked():
    req = parse(OPTS, method="m", n_steps=8)
    assert req.options == {"n_steps": 8, "integration": "gausslegendre"}
    assert req.classes is None and req.top_k is None and req.known_k == 1
    with pytest.raises(ValueError, match=r"n_steps must be a positive int, got 0"):
        parse(OPTS, method="m", n_steps=0)
    with pytest.raises(ValueError, match=r"integration must be one of 'gausslegendre', 'riemann_left', got 'x'"):
        parse(OPTS, method="m", integration="x")
    with pytest.raises(TypeError, match=r"method 'm' has no option 'nsteps' .*did you mean 'n_steps'"):
        parse(OPTS, method="m", nsteps=3)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(classes=[1, 2], top_k=2), ValueError, "either classes= or top_k="),
    (dict(classes=lambda out: out, top_k=2), ValueError, "top_k does not apply when classes is a callable"),
    (dict(top_k=0), ValueError, "top_k must be None or a positive int, got 0"),
    (dict(top_k=True), ValueError, "top_k must be None or a positive int, got True"),
    (dict(classes=[1.5]), TypeError, "classes must be integers"),
    (dict(classes=torch.tensor([0.5])), TypeError, "integer tensor"),
    (dict(classes=torch.zeros(1, 1, 1, dtype=torch.long)), ValueError, r"shape \(K,\) or \(B, K\)"),
    (dict(classes=[2**70]), ValueError, "classes must lie in"),
    (dict(classes="all"), TypeError, "classes must be an int, a list of ints"),
    (dict(chunk_size=0), ValueError, "chunk_size must be None or a positive int, got 0"),
    (dict(max_memory=-1), ValueError, "max_memory must be None or a positive number of bytes, got -1"),
])
def test_bad_arguments_are_refused_before_any_forward(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        parse((), **kwargs)
    calls = []

    class Spy(torch.nn.Module):  # funcam.cam refuses before the model runs
        def forward(self, x):
            calls.append(1)
            return x.mean((2, 3))

    with pytest.raises(exc, match=msg):
        funcam.cam(Spy(), torch.randn(1, 3, 4, 4), method="guided_backprop", **kwargs)
    assert not calls


def test_resolve_checks_the_range_against_the_model():
    logits = torch.randn(2, 5)
    torch.testing.assert_close(resolve(parse(classes=[4, 0]), logits), torch.tensor([[4, 0], [4, 0]]))
    torch.testing.assert_close(resolve(parse(top_k=2), logits), logits.topk(2, dim=1).indices)
    with pytest.raises(ValueError, match=r"lie in \[0, 5\) \(the model has 5 classes\), got values from -1 to 4"):
        resolve(parse(classes=[-1, 4]), logits)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 5\]"):
        resolve(parse(top_k=6), logits)
    with pytest.raises(ValueError, match=r"shape \(K,\) or \(B, K\) = \(2, K\)"):
        resolve(parse(classes=torch.zeros(3, 1, dtype=torch.long)), logits)


def test_chunk_follows_chunk_size_then_max_memory():
    assert Request(chunk_size=3).chunk(10**9, 100) == 3
    assert Request(max_memory=1000).chunk(100, 100) == 10
    assert Request(max_memory=1000).chunk(100, 5) is None  # all fit
    assert Request().chunk(request.DEFAULT_MAX_MEMORY // 4, 100) == 4


def test_one_request_explains_the_same_classes_at_every_entry():
    model, x = make_model("resnet18"), make_input("resnet18")
    with torch.no_grad():
        by_cam = funcam.cam(model, x, top_k=3)
        by_list = funcam.gradcam(model, x, by_cam.classes)
    assert bool(by_cam.maps.any())
    torch.testing.assert_close(by_cam.maps, by_list)
