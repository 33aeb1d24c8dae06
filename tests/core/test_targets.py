"""funcam.targets: the score callables against hand-written formulas, pytorch-grad-cam's targets, and per-target
autograd loops on the unmodified model (forward hooks), in float64."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import funcam
from funcam.targets import UnmatchedBoxWarning, box_matches, boxes, prompts, region
from tests._oracle import hooked_forward


def _embedder(d: int = 6) -> nn.Module:
    """x (B, 3, H, W) -> (B, d) embedding: a small CNN whose head is not a plain average pool + Linear."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1),
                         nn.GELU(), nn.Flatten(), nn.Linear(12 * 16, d)).double().eval()


class _Segmenter(nn.Module):
    """x (B, 3, H, W) -> {"out": (B, 4, H, W)}: a small fully convolutional segmenter (torchvision's dict output)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                  nn.Tanh())
        self.cls = nn.Conv2d(8, 4, 1, bias=False)  # signed features, no bias: every class wins somewhere

    def forward(self, x):
        out = F.interpolate(self.cls(self.body(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": out}


def _hooked_gradcam(model, layer, x, score):
    """Raw Grad-CAM (B, K, h, w) at ``layer``'s output, one autograd.grad per image and score: the oracle."""
    maps = []
    for b in range(x.shape[0]):
        out, (a,) = hooked_forward(model, [layer], x[b:b + 1])
        s = score(out)[0]
        row = []
        for k in range(s.shape[0]):
            (g,) = torch.autograd.grad(s[k], a, retain_graph=True)
            row.append((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1)[0])
        maps.append(torch.stack(row))
    return torch.stack(maps).detach()


def _close(got, want, tol=1e-5):
    scale = want.abs().amax()
    assert scale > 0, "the oracle's maps are all zero"
    assert got.shape == want.shape
    assert (got - want).abs().amax() <= tol * scale, float((got - want).abs().amax() / scale)


# --- prompts -------------------------------------------------------------------------------------------------------

def test_prompts_score_is_the_scaled_cosine_of_each_pair():
    g = torch.Generator().manual_seed(0)
    text, emb = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g,
                                                                                 dtype=torch.float64)
    scale = torch.tensor(2.5, dtype=torch.float64).log().exp()  # as CLIP's logit_scale.exp() is
    want = torch.tensor([[2.5 * float(e @ t / (e.norm() * t.norm())) for t in text] for e in emb], dtype=torch.float64)
    torch.testing.assert_close(prompts(text, logit_scale=scale)(emb), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(prompts(text)(emb), want / 2.5, rtol=1e-12, atol=1e-12)

    class HFOutput:  # a Hugging Face output: .image_embeds
        image_embeds = emb
    for out in (HFOutput(), {"image_features": emb}, (emb, None, 1.0)):
        torch.testing.assert_close(prompts(text, logit_scale=2.5)(out), want, rtol=1e-12, atol=1e-12)


def test_prompts_refuse_bad_input():
    text = torch.randn(4, 6)
    with pytest.raises(ValueError, match="text_embeddings"):
        prompts(torch.randn(6))
    with pytest.raises(ValueError, match="logit_scale"):
        prompts(text, logit_scale=-1.0)
    with pytest.raises(TypeError, match="logit_scale"):
        prompts(text, logit_scale=torch.ones(2))
    with pytest.raises(ValueError, match="D = 5"):
        prompts(text)(torch.randn(2, 5))
    with pytest.raises(TypeError, match="image embedding"):
        prompts(text)({"logits": torch.randn(2, 6)})


@pytest.mark.parametrize("k", [3, 40])  # K < hw (one vjp, vmapped), K > hw (forward mode over the 4x4 positions)
def test_prompts_maps_equal_a_per_prompt_autograd_loop(k):
    model = _embedder()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    text = torch.randn(k, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    score = prompts(text, logit_scale=30.0)
    sp = funcam.split(model, "3", example=x)  # the GELU after the second conv
    got = funcam.cam(sp, x, classes=score, relu=False)
    _close(got.maps, _hooked_gradcam(model, model[3], x, score))
    assert got.classes is None and torch.equal(got.logits, model(x))
    # batched equals one call per prompt; the scale multiplies the maps
    loop = torch.cat([funcam.gradcam(sp, x, prompts(text[i:i + 1], logit_scale=30.0), relu=False) for i in range(k)],
                     dim=1)
    _close(got.maps, loop, 1e-10)
    _close(funcam.gradcam(sp, x, prompts(text), relu=False) * 30.0, got.maps, 1e-10)


# --- regions -------------------------------------------------------------------------------------------------------

def _pgc_region_maps(model, layer, x, classes, masks):
    """pytorch-grad-cam's raw Grad-CAM with SemanticSegmentationTarget, one call per (mask, class) column."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    class Out(nn.Module):  # pytorch-grad-cam's segmentation tutorial's wrapper: the dict's "out"
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, t):
            return self.m(t)["out"]

    cols = []
    with GradCAM(model=Out(model), target_layers=[layer]) as cam:
        for k, c in enumerate(classes):
            targets = [SemanticSegmentationTarget(c, masks[b, k].numpy()) for b in range(x.shape[0])]
            cam(input_tensor=x, targets=targets)
            acts, grads = cam.activations_and_grads.activations, cam.activations_and_grads.gradients
            cols.append(cam.get_cam_image(x, layer, targets, acts[0].numpy(), grads[0].numpy(), False))
    return torch.from_numpy(np.stack(cols, 1))


@pytest.mark.parametrize("given", [True, False])  # a given mask; the predicted one (mask=None)
def test_region_equals_pytorch_grad_cam_segmentation_target(given):
    model = _Segmenter().double().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    classes = [2, 1, 3]
    with torch.no_grad():
        pred = model(x)["out"].argmax(dim=1)  # (B, H, W)
    if given:
        masks = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64) > 0.5
    else:
        masks = pred[:, None] == torch.tensor(classes)[None, :, None, None]
    assert masks.flatten(2).any(-1).all(), "every mask should hold pixels, else the comparison is vacuous"
    score = region(masks if given else None, classes)
    sp = funcam.split(model, "body.3", example=x)
    got = funcam.cam(sp, x, classes=score, relu=False).maps
    want = _pgc_region_maps(model, model.body[3], x, classes, masks.double())
    _close(got, want)
    # the score itself: the class's logits summed inside its mask
    with torch.no_grad():
        out = model(x)
        hand = torch.stack([(out["out"][:, c] * masks[:, k]).sum(dim=(1, 2)) for k, c in enumerate(classes)], 1)
        torch.testing.assert_close(score(out), hand, rtol=1e-12, atol=1e-12)


def test_region_masks_broadcast_and_refusals():
    logits = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    want = torch.stack([(logits[:, c] * mask).sum(dim=(1, 2)) for c in (1, 3)], 1)
    torch.testing.assert_close(region(mask, [1, 3])(logits), want)
    torch.testing.assert_close(region(mask.expand(2, 5, 6), torch.tensor([1, 3]))({"out": logits}), want)
    with pytest.raises(ValueError, match="resize"):
        region(torch.ones(4, 4), 1)(logits)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        region(None, 4)(logits)
    with pytest.raises(ValueError, match="3 masks"):
        region(torch.ones(3, 5, 6), [0, 1])
    with pytest.raises(ValueError, match="classes"):
        region(None, [])


# --- boxes ---------------------------------------------------------------------------------------------------------

def _detections(seed: int = 8) -> list:
    """Two images' detections (differentiable boxes and scores), the second with none."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(6, 2, generator=g, dtype=torch.float64) * 40
    wh = 5 + torch.rand(6, 2, generator=g, dtype=torch.float64) * 20
    dets = {"boxes": torch.cat([xy, xy + wh], 1).requires_grad_(), "labels": torch.tensor([1, 2, 1, 3, 2, 1]),
            "scores": torch.rand(6, generator=g, dtype=torch.float64).requires_grad_()}
    empty = {"boxes": torch.zeros(0, 4, dtype=torch.float64), "labels": torch.zeros(0, dtype=torch.long),
             "scores": torch.zeros(0, dtype=torch.float64)}
    return [dets, empty]


def test_boxes_score_and_gradient_equal_pytorch_grad_cam_per_box():
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    dets = _detections()
    d = dets[0]["boxes"].detach()
    # reference boxes: a detection moved a little (match), the same box with another label (its best overlap has
    # another label: no match), a far box (no overlap), and a box whose best overlap is of the right label
    ref = torch.stack([d[0] + 1.0, d[1], torch.tensor([200.0, 200, 210, 210], dtype=torch.float64), d[3] - 0.5])
    labels = torch.tensor([1, 1, 2, 3])
    with pytest.warns(UnmatchedBoxWarning, match="reference boxes match no detection"):
        got = boxes(ref, labels)(dets)  # (B, N)
    assert got.shape == (2, 4) and torch.equal(got[1], torch.zeros(4, dtype=torch.float64))
    for n in range(4):
        pgc = FasterRCNNBoxScoreTarget([int(labels[n])], ref[n:n + 1].numpy())(dets[0])[0]
        torch.testing.assert_close(got[0, n], pgc, rtol=1e-12, atol=1e-12)
        want = torch.autograd.grad(pgc, [dets[0]["boxes"], dets[0]["scores"]], allow_unused=True,
                                   retain_graph=True) if pgc.requires_grad else (None, None)  # unmatched: constant
        have = torch.autograd.grad(got[0, n], [dets[0]["boxes"], dets[0]["scores"]], retain_graph=True)
        for w, h in zip(want, have):
            torch.testing.assert_close(h, torch.zeros_like(h) if w is None else w, rtol=1e-12, atol=1e-12)
    assert torch.equal(box_matches(dets, ref, labels), torch.tensor([[True, False, False, True], [False] * 4]))
    assert (got[0, [0, 3]] > 1).all() and torch.equal(got[0, [1, 2]], torch.zeros(2, dtype=torch.float64))


def test_boxes_reference_equal_to_its_detection_up_to_roundoff_has_no_iou_gradient():
    """A model's own detection as the reference: IoU = 1, its peak. pytorch-grad-cam on the bitwise-equal box gets
    no gradient from the IoU (torch splits max / min ties in half), and funcam gets the same for a detection that a
    split recomputed with roundoff-sized differences, where plain autograd would give a one-sided derivative."""
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    dets = _detections()[:1]
    d, s = dets[0]["boxes"], dets[0]["scores"]
    pgc = FasterRCNNBoxScoreTarget([1], d[:1].detach().numpy())(dets[0])[0]
    want = torch.autograd.grad(pgc, [d, s])
    assert torch.equal(want[0], torch.zeros_like(d)) and float(want[1][0]) == 1.0
    off = d.detach()[0] * (1 + 1e-14 * torch.tensor([1.0, -1, 1, -1], dtype=torch.float64))  # roundoff
    pgc_off = FasterRCNNBoxScoreTarget([1], off[None].numpy())(dets[0])[0]
    assert torch.autograd.grad(pgc_off, d)[0].abs().amax() > 0.01  # the one-sided derivative: roundoff's doing
    for ref in (d.detach()[0], off):
        got = boxes(ref[None], [1])(dets)[0, 0]
        torch.testing.assert_close(got, pgc, rtol=1e-12, atol=1e-12)
        for w, h in zip(want, torch.autograd.grad(got, [d, s])):
            torch.testing.assert_close(h, w, rtol=0, atol=1e-15)
    # off the peak by more than roundoff (1e-3 px): the IoU's derivative, as pytorch-grad-cam's
    ref = d.detach()[0] + 1e-3
    pgc = FasterRCNNBoxScoreTarget([1], ref[None].numpy())(dets[0])[0]
    want = torch.autograd.grad(pgc, d)[0]
    assert want.abs().amax() > 0.01
    torch.testing.assert_close(torch.autograd.grad(boxes(ref[None], [1])(dets)[0, 0], d)[0], want, rtol=1e-12,
                               atol=1e-12)


def test_boxes_per_image_references_and_refusals():
    dets = _detections()[:1] * 2
    d = dets[0]["boxes"].detach()
    ref = torch.stack([d[[0, 2]], d[[5, 1]]])  # (B, N, 4): each image its own boxes
    labels = torch.tensor([[1, 1], [1, 2]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every box matches: no warning
        got = boxes(ref, labels, iou=0.9)(dets)
    scores = dets[0]["scores"].detach()
    torch.testing.assert_close(got, 1 + torch.stack([scores[[0, 2]], scores[[5, 1]]]))
    with pytest.raises(ValueError, match="labels"):
        boxes(ref, labels[0])
    with pytest.raises(ValueError, match="iou"):
        boxes(ref, labels, iou=1.0)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        boxes(torch.ones(3, 5), [1, 2, 3])
    with pytest.raises(TypeError, match="list of per-image dicts"):
        boxes(ref, labels)(torch.randn(2, 10))
