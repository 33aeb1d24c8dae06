"""Ablation-CAM (funcam/_src/core/ablation.py): the paper's formula by a slow loop over channels (one head run with
channel c zeroed per channel), on the pooled closed form and on heads that are re-run, at post-ReLU and signed cuts;
pytorch-grad-cam's AblationCAM on post-ReLU cuts, where its ablation value (0 when the layer's minimum is 0) is the
paper's."""
from __future__ import annotations

import copy

import pytest
import torch

import funcam
from funcam import Features
from tests.conftest import make_model, noised
from tests.core._peers import TOL, pgc_processed, pgc_run, rel_err

CLASSES = torch.tensor([[1, 3], [4, 1]])  # (B, K)
SIZE = (32, 32)


@pytest.fixture(scope="module")
def setup(one_thread):
    model = noised(copy.deepcopy(make_model("resnet18", dtype=torch.float64)))
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, x


def paper_loop(sp, x, score, relu=True):
    """Desai & Ramaswamy 2020, eq. 3-4 by hand: w_kc = (y_k - y_k with channel c of A zeroed) / y_k, map sum_c w A_c;
    ``score(output) -> (B, K)``. The head is fed what extract returned (one map; context as it was)."""
    with torch.no_grad():
        feats = sp.extract(x)
        a = feats.maps[0] if isinstance(feats, Features) else feats

        def head(m):
            return sp.head(Features((m,), feats.context, feats.chained) if isinstance(feats, Features) else m)

        y = score(head(a))
        drops = []
        for c in range(a.shape[1]):
            ablated = a.clone()
            ablated[:, c] = 0
            drops.append(y - score(head(ablated)))
        w = torch.stack(drops, dim=2) / y.unsqueeze(2)  # (B, K, C)
        maps = torch.einsum("bkc,bchw->bkhw", w, a)
    return maps.clamp_min(0) if relu else maps


def by_index(out):
    return out.gather(1, CLASSES)


@pytest.mark.parametrize("where", ["pooled", "pooled-as-general",
                                   pytest.param("layer3", marks=pytest.mark.slow),  # a graph capture, 256 head runs
                                   pytest.param("signed-bn", marks=pytest.mark.slow)])
def test_equals_the_papers_formula(setup, where):
    model, x = setup
    sp = {"pooled": lambda: funcam.split(model),
          "pooled-as-general": lambda: funcam.split(model)._replace(pooled=None),
          "layer3": lambda: funcam.split(model, "layer3"),
          "signed-bn": lambda: funcam.split(model, "layer4.0.bn2")}[where]()  # before the block's ReLU: signed
    pooled = sp.pooled(sp.extract(x)) if callable(sp.pooled) else sp.pooled  # a graph route's per-capture lookup
    assert (pooled is not None) == (where == "pooled")
    got = funcam.ablationcam(sp, x, CLASSES, relu=False)
    want = paper_loop(sp, x, by_index, relu=False)
    assert got.shape == want.shape and bool((want != 0).any())
    assert rel_err(got, want) <= 1e-10


def test_score_callables_and_classes_at_once_equal_one_call_per_class(setup):
    model, x = setup
    sp = funcam.split(model)
    prob = lambda out: out.softmax(dim=1).gather(1, CLASSES)  # a non-linear score: the head is run per ablation
    got = funcam.ablationcam(sp, x, prob, relu=False)
    torch.testing.assert_close(got, paper_loop(sp, x, prob, relu=False), rtol=1e-10, atol=1e-12)
    both = funcam.cam(sp, x, CLASSES, method="ablationcam")
    loop = torch.cat([funcam.ablationcam(sp, x, CLASSES[:, k:k + 1]) for k in range(2)], dim=1)
    assert both.classes.tolist() == CLASSES.tolist() and bool((both.maps > 0).any())
    torch.testing.assert_close(loop, both.maps, rtol=1e-12, atol=1e-14)
    general = funcam.split(model)._replace(pooled=None)
    chunked = funcam.ablationcam(general, x, CLASSES, max_memory=1)  # one ablated head per vmapped chunk
    torch.testing.assert_close(chunked, both.maps, rtol=1e-10, atol=1e-12)


@pytest.mark.slow  # pytorch-grad-cam runs one full forward per channel, image and class
@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_equals_pytorch_grad_cam_after_a_relu(setup, layer):
    from pytorch_grad_cam import AblationCAM
    model, _ = setup
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # layer4: 2x2
    module = model.get_submodule(layer)
    with torch.no_grad():
        feats = funcam.split(model, layer).extract(x)
    assert float(feats.maps[0].min() if isinstance(feats, Features) else feats.min()) == 0  # the peer ablates by 0
    want = pgc_run(AblationCAM, model, [module], x, CLASSES[:1])
    sp = funcam.split(model) if layer == "layer4" else funcam.split(model, layer)
    got = funcam.ablationcam(sp, x, CLASSES[:1])
    assert bool((got > 0).any()) and rel_err(pgc_processed(got, (64, 64)), want) <= TOL
