"""ShapleyCAM (funcam/_src/core/shapley.py, engine.class_hvp) against pytorch-grad-cam's ShapleyCAM in float64,
where the second-order term is not zero: a head with LayerNorm (convnext_atto) and a softmax score on a ReLU head;
on a piecewise-linear head it is Grad-CAM."""
from __future__ import annotations

import copy

import torch

import funcam
from tests.conftest import make_model, noised
from tests.core._peers import TOL, pgc_processed, pgc_run, rel_err

CLASSES = torch.tensor([[1, 3], [4, 1]])  # (B, K)


def _x(size, seed=0):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_equals_pytorch_grad_cam_on_a_layer_norm_head(one_thread):
    from pytorch_grad_cam import ShapleyCAM
    model, x = noised(copy.deepcopy(make_model("convnext_atto", dtype=torch.float64))), _x(96)
    sp = funcam.split(model)  # forward_features: the last stage's output, a head of pooling, LayerNorm and fc
    got = funcam.shapleycam(sp, x, CLASSES)
    plain = funcam.gradcam(sp, x, CLASSES)
    assert got.shape == (2, 2, 3, 3) and rel_err(got, plain) > 1e-3  # the Hessian term is not negligible here
    want = pgc_run(ShapleyCAM, model, [model.stages[-1]], x, CLASSES)
    assert rel_err(pgc_processed(got, (96, 96)), want) <= TOL
    loop = torch.cat([funcam.shapleycam(sp, x, CLASSES[:, k:k + 1]) for k in range(2)], dim=1)
    torch.testing.assert_close(loop, got, rtol=1e-10, atol=1e-12)


def test_equals_pytorch_grad_cam_for_a_softmax_score_and_is_grad_cam_on_a_relu_head(one_thread):
    from pytorch_grad_cam import ShapleyCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    model, x = noised(copy.deepcopy(make_model("resnet18", dtype=torch.float64))), _x(64)
    sp = funcam.split(model, "layer3")  # 4x4; the head: layer4, pooling, fc (ReLUs: piecewise linear)
    prob = lambda out: out.softmax(dim=1).gather(1, CLASSES)
    got = funcam.shapleycam(sp, x, prob)
    want = pgc_run(ShapleyCAM, model, [model.layer3], x, CLASSES, targets=ClassifierOutputSoftmaxTarget)
    assert bool((got > 0).any()) and rel_err(pgc_processed(got, (64, 64)), want) <= TOL
    torch.testing.assert_close(funcam.shapleycam(sp, x, CLASSES, relu=False),
                               funcam.gradcam(sp, x, CLASSES, relu=False), rtol=1e-10, atol=1e-14)


def test_grad_mode_in_chunks_is_differentiable_and_equal(one_thread):
    """Grad mode on, the classes in chunks: the maps equal the no-grad ones and their gradient w.r.t. a head
    parameter matches a per-class loop's (class_hvp runs torch.func transforms per class, which a checkpoint
    refuses: its chunks are not checkpointed)."""
    model, x = noised(copy.deepcopy(make_model("convnext_atto", dtype=torch.float64))), _x(64)
    sp = funcam.split(model)
    w = model.head.fc.weight
    with torch.no_grad():
        want = funcam.shapleycam(sp, x, CLASSES, relu=False)
    for chunk in (1, 2):
        got = funcam.shapleycam(sp, x, CLASSES, relu=False, chunk_size=chunk)
        assert got.requires_grad and bool((want != 0).any())
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(got.square().sum(), w)
    per_class = sum(funcam.shapleycam(sp, x, CLASSES[:, k:k + 1], relu=False).square().sum() for k in range(2))
    (g_loop,) = torch.autograd.grad(per_class, w)
    assert torch.count_nonzero(g) > 0
    torch.testing.assert_close(g, g_loop, rtol=1e-8, atol=1e-12)
