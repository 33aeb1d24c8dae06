"""Score callables on outputs that are not logits: a segmentation model's dict and an embedding.

The oracle is the per-score loop on the same split: one ``head(extract(x))``, then ``torch.autograd.grad`` of
each score column separately w.r.t. the cut feature and the method's formula by hand. funcam's one vmapped vjp
must give the same maps (to 1e-5 of the map's scale in float32), and they must not be all zero.

The cases are tiny, random-weight versions of ``examples/segmentation.py`` (a dict output ``{"out": (B, N, H, W)}``
read through ``x.shape``, "class c inside the pixels predicted as c") and ``examples/embedding_similarity.py``
(cosine similarity to K reference embeddings), through both routes: timm's ``forward_features`` split (with its
average-pool fast path) and the graph route. The examples check the same on their real-weight models; a torchvision
DeepLabV3 is in the slow suite (its capture alone takes about 10 s here).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import funcam
from tests._oracle import loop_cams
from tests.conftest import timm_model, tv_model

B = 2
LABELS = torch.tensor([1, 2, 3])  # K=3 segmentation labels explained


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def loop_maps(split: funcam.Split, x: Tensor, score_fn, method: str) -> Tensor:
    """The oracle: (B, K, h, w) maps from one backward per score column on ``split``'s own feature."""
    return loop_cams(split, x, score_fn, method, relu=True)


def assert_matches_loop(split: funcam.Split, x: Tensor, score_fn, method: str) -> None:
    out = funcam.cam(split, x, classes=score_fn, method=method)
    want = loop_maps(split, x, score_fn, method)
    got = out.maps.detach()
    assert out.classes is None and got.shape == want.shape
    scale = want.abs().amax(dim=(-2, -1), keepdim=True).clamp(min=1e-30)
    assert ((got - want).abs() <= 1e-5 * scale).all(), ((got - want).abs() / scale).max()
    assert (want.abs().amax(dim=(-2, -1)) > 0).any(), "every map is zero: the oracle says nothing"


# --- segmentation: a dict output ---------------------------------------------------------------------------

class TinySegmenter(nn.Module):
    """x (B, 3, H, W) -> {"out": (B, 4, H, W), "aux": ...}: a stride-4 conv net, its per-position logits upsampled
    to the input's size as torchvision's segmentation models do (``x.shape`` read in the forward)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU())
        self.classifier = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        f = self.body(x)
        logits = self.classifier(f)
        return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False),
                "aux": logits.mean(dim=(2, 3))}


def inside_mask(out: dict) -> Tensor:
    """pytorch-grad-cam's SemanticSegmentationTarget for K labels at once: label c's logits summed over the pixels
    predicted as c -> (B, K)."""
    seg = out["out"]
    mask = seg.argmax(dim=1, keepdim=True) == LABELS.view(1, -1, 1, 1)
    return (seg[:, LABELS] * mask).sum(dim=(2, 3))


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    model = TinySegmenter().eval()
    x = torch.randn(B, 3, 32, 48, generator=torch.Generator().manual_seed(1))  # non-square: an 8x12 map
    return model, funcam.split(model, example=x), x


@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_segmentation_mask_scores_equal_the_loop(segmenter, method):
    model, split, x = segmenter
    assert_matches_loop(split, x, inside_mask, method)


def test_segmentation_split_and_output(segmenter):
    model, split, x = segmenter
    funcam.check_split(split, x)
    out = funcam.cam(split, x, classes=inside_mask)
    assert out.maps.shape == (B, 3, 8, 12)
    ref = model(x)
    assert isinstance(out.logits, dict) and torch.allclose(out.logits["out"], ref["out"], atol=1e-5)
    # a label predicted nowhere has an empty mask, a zero score and a zero map; the others do not
    pred = ref["out"].argmax(dim=1)
    present = torch.stack([(pred == c).flatten(1).any(dim=1) for c in LABELS.tolist()], dim=1)  # (B, K)
    nonzero = out.maps.detach().flatten(2).gt(0).any(dim=2)
    assert not nonzero[~present].any() and present.any()


def test_integer_classes_on_a_dict_output_say_to_pass_a_callable(segmenter):
    _, split, x = segmenter
    with pytest.raises(ValueError, match="callable"):
        funcam.cam(split, x, classes=[1])


@pytest.mark.slow
def test_torchvision_deeplabv3_mask_scores_equal_the_loop():
    model = tv_model("segmentation.deeplabv3_mobilenet_v3_large", num_classes=4)
    x = torch.randn(B, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert_matches_loop(funcam.split(model, example=x), x, inside_mask, "gradcam")


# --- embeddings: cosine similarity to K references ---------------------------------------------------------

class Embedder(nn.Module):
    """A timm backbone without classifier behind a wrapper: unit-norm embeddings (B, D), the graph route."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return F.normalize(self.net(x), dim=1)


@pytest.fixture(scope="module")
def embedders():
    net = timm_model("resnet18", num_classes=0)  # output: (B, 512) pooled
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, 3, 64, 96, generator=g)
    with torch.no_grad():
        refs = net(torch.randn(3, 3, 64, 64, generator=g))  # K=3 reference embeddings
    wrapped = Embedder(net).eval()
    return {"timm": (funcam.split(net), net), "wrapper": (funcam.split(wrapped, example=x), wrapped)}, x, refs


@pytest.mark.parametrize("route", ["timm", "wrapper"])
@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_embedding_similarity_equals_the_loop(embedders, route, method):
    splits, x, refs = embedders
    split, _ = splits[route]

    def similarity(emb):
        return F.normalize(emb, dim=1) @ F.normalize(refs, dim=1).T  # (B, K)

    assert_matches_loop(split, x, similarity, method)


def test_embedding_routes_agree(embedders):
    """The fast path (timm's pooled head) and the graph route cut the same feature, the last stage's output."""
    splits, x, refs = embedders
    assert splits["timm"][0].pooled is not None  # the average-pool fast path takes the score callable
    maps = [funcam.gradcam(sp, x, lambda e: F.normalize(e, dim=1) @ F.normalize(refs, dim=1).T)
            for sp, _ in splits.values()]
    assert maps[0].shape == maps[1].shape == (B, 3, 2, 3)
    scale = maps[0].abs().max()
    assert scale > 0 and (maps[0] - maps[1]).abs().max() <= 1e-5 * scale
    assert splits["wrapper"][0].layers == ("net.layer4",)
