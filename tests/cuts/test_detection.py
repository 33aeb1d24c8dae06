"""Detection splits (torchvision R-CNNs and dense detectors, Ultralytics YOLO), random weights, small inputs: the
split's detections equal the model's, and each reference box's Grad-CAM per level equals a per-box autograd loop on
the unmodified model (a forward hook on its feature levels; pytorch-grad-cam's FasterRCNNBoxScoreTarget as the score)
in float64."""
from __future__ import annotations

import warnings

import pytest
import torch

import funcam
from funcam._src.cuts import detection, yolo
from funcam.targets import UnmatchedBoxWarning, boxes
from tests.conftest import noised

KW = dict(weights=None, weights_backbone=None, num_classes=5, min_size=64, max_size=96)


def _tv(name: str):
    """A torchvision detector with random weights (zero-initialised ones noised), every detection kept (score
    threshold 0: random weights score every class about alike), small internal sizes."""
    from torchvision.models import detection as D

    torch.manual_seed(0)
    thresh = {"box_score_thresh": 0.0} if "rcnn" in name else {"score_thresh": 0.0}
    kw = dict(KW, **thresh)
    if name == "ssdlite":
        kw.pop("min_size"), kw.pop("max_size")
        return noised(D.ssdlite320_mobilenet_v3_large(**kw).double().eval())
    if "mobilenet" in name:  # stride 32 at both levels: a larger internal size for 4x5 maps
        kw.update(min_size=128, max_size=160)
    model = noised(getattr(D, name)(**kw).double().eval())
    if name.startswith("fcos"):
        # FCOS's box distances are relu(conv) of a zero-bias conv: at random weights about half are 0, and the top
        # detections are zero-area boxes (IoU 0 / 0 with themselves: no reference matches, every map zero). A bias
        # of 1 makes every distance about one anchor size, as a trained head's are.
        with torch.no_grad():
            model.head.regression_head.bbox_reg.bias.fill_(1.0)
    return model


def _tiny(kind: str):
    """A small torchvision R-CNN / RetinaNet / FCOS: a 4-conv body with a 32-channel FPN (FCOS's group norms need
    32), levels '0'-'2' at strides 4, 8, 16 plus the RPN's max-pooled level or P6/P7, 4 classes, every detection
    kept."""
    from collections import OrderedDict

    from torch import nn
    from torchvision.models import detection as D
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    torch.manual_seed(0)
    conv = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1), nn.ReLU())
    body = nn.Sequential(OrderedDict(c1=conv(3, 8), c2=conv(8, 16), c3=conv(16, 16), c4=conv(16, 16)))
    extra = None if kind == "faster" else LastLevelP6P7(32, 32)
    backbone = BackboneWithFPN(body, {"c2": "0", "c3": "1", "c4": "2"}, [16, 16, 16], 32, extra_blocks=extra)
    sizes = ((8,), (16,), (32,), (64,)) if kind == "faster" else ((8,), (16,), (32,), (64,), (128,))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes) if kind != "fcos" else ((1.0,),) * len(sizes))
    kw = dict(min_size=64, max_size=96, num_classes=4)
    if kind == "faster":
        model = D.FasterRCNN(backbone, rpn_anchor_generator=anchors, box_score_thresh=0.0,
                             box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], 7, 2), rpn_pre_nms_top_n_test=200,
                             rpn_post_nms_top_n_test=50, box_detections_per_img=30, representation_size=32, **kw)
    elif kind == "retina":
        model = D.RetinaNet(backbone, anchor_generator=anchors, score_thresh=0.0, detections_per_img=30, **kw)
    else:
        model = D.FCOS(backbone, anchor_generator=anchors, score_thresh=0.0, detections_per_img=30, **kw)
    return noised(model.double().eval())


def _yolo():
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DetectionModel("yolo11n.yaml", nc=5, verbose=False).double().eval()
    # ultralytics starts the class logits at about -6 to -9 (a prior of 5 objects per 640 px image): every score
    # a sigmoid's flat tail, gradients about 1e-15, compared at roundoff. Zero class biases make the scores 0.5.
    with torch.no_grad():
        for branch in model.model[-1].cv3:
            branch[-1].bias.zero_()
    return model


def _levels_hook(model):
    """(module to hook, output -> list of level tensors) for the unmodified model's feature levels."""
    if hasattr(model, "backbone"):
        names = detection.split(model).layers  # ('backbone:0', ...): the levels the head reads
        keys = [n.split(":", 1)[1] for n in names]
        return [model.backbone], lambda outs: [outs[0][k] for k in keys]
    idx = model.model[-1].f
    return [model.model[j] for j in idx], lambda outs: list(outs)


def _detect(model, xb):
    """The unmodified model's detections of one image (B = 1) as a list of one dict."""
    if hasattr(model, "backbone"):
        return model(list(xb))
    from ultralytics.utils.nms import non_max_suppression

    y, _ = model(xb)
    kept, idx = non_max_suppression(y.detach(), 0.001, 0.7, max_det=300, return_idxs=True)
    i, lab = idx[0].long().reshape(-1), kept[0][:, 5].long()
    c, wh = y[0, :2, i].T, y[0, 2:4, i].T
    return [{"boxes": torch.cat([c - wh / 2, c + wh / 2], 1), "labels": lab, "scores": y[0, 4 + lab, i]}]


def _hooked(model, xb):
    """(the unmodified model's feature levels, its detections) for one image xb (1, 3, H, W), by forward hooks."""
    mods, levels = _levels_hook(model)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(out)) for m in mods]
    try:
        (dets,) = _detect(model, xb)
    finally:
        for h in hooks:
            h.remove()
    return levels(seen), dets


def _oracle(model, x, ref, labels):
    """Per level, raw Grad-CAM (B, N, h, w) of pytorch-grad-cam's FasterRCNNBoxScoreTarget for each reference box
    alone, one autograd.grad per image and box at forward hooks on the unmodified model's levels."""
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    per_image = []
    for b in range(x.shape[0]):
        acts, dets = _hooked(model, x[b:b + 1])
        rows = []
        for n in range(ref.shape[1]):
            s = FasterRCNNBoxScoreTarget([int(labels[b, n])], ref[b, n:n + 1].numpy())(dets)[0]
            grads = torch.autograd.grad(s, acts, allow_unused=True, retain_graph=True) if s.requires_grad else \
                [None] * len(acts)
            rows.append([torch.zeros_like(a[0, 0]) if g is None else (g.mean(dim=(2, 3), keepdim=True) * a).sum(1)[0]
                         for g, a in zip(grads, acts)])
        per_image.append(rows)
    return [torch.stack([torch.stack([r[lv] for r in rows]) for rows in per_image]).detach()
            for lv in range(len(per_image[0][0]))]


MODELS = {
    "tiny_fasterrcnn": (lambda: _tiny("faster"), detection),
    "tiny_retinanet": (lambda: _tiny("retina"), detection),
    "tiny_fcos": (lambda: _tiny("fcos"), detection),
    "fasterrcnn_mobilenet_v3_large_fpn": (lambda: _tv("fasterrcnn_mobilenet_v3_large_fpn"), detection),
    "ssdlite": (lambda: _tv("ssdlite"), detection),
    "yolo11n": (_yolo, yolo),
    "fasterrcnn_resnet50_fpn": (lambda: _tv("fasterrcnn_resnet50_fpn"), detection),
    "maskrcnn_resnet50_fpn": (lambda: _tv("maskrcnn_resnet50_fpn"), detection),
    "retinanet_resnet50_fpn": (lambda: _tv("retinanet_resnet50_fpn"), detection),
    "fcos_resnet50_fpn": (lambda: _tv("fcos_resnet50_fpn"), detection),
}
FAST = ["tiny_fasterrcnn", "tiny_retinanet", "tiny_fcos"]
PARAMS = [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in MODELS]


def _split(route, model):
    return route.split(model, conf=0.001) if route is yolo else route.split(model)


@pytest.mark.parametrize("name", PARAMS)
def test_box_maps_equal_a_per_box_autograd_loop(name):
    make, route = MODELS[name]
    model = make()
    assert route.applies(model)
    sp = _split(route, model)
    size = (320, 320) if name == "ssdlite" else (64, 96)
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        got = sp.head(sp.extract(x))
        want = [_detect(model, x[b:b + 1])[0] for b in range(2)]
    for g, w in zip(got, want):  # the split's detections are the model's, in the same order
        assert g["boxes"].shape[0] > 3
        for k in ("boxes", "labels", "scores"):
            torch.testing.assert_close(g[k], w[k], rtol=1e-9, atol=1e-9)
    # per image: one of its own detections (IoU 1, its peak: no gradient from the IoU term), one shrunk by 2% about
    # its centre (IoU 0.96: the IoU term's gradient through the box regression), one that cannot match (another label)
    shrunk = lambda b: torch.cat([0.99 * b[:2] + 0.01 * b[2:], 0.01 * b[:2] + 0.99 * b[2:]])
    ref = torch.stack([torch.stack([w["boxes"][0], shrunk(w["boxes"][2]), w["boxes"][1]]) for w in want])
    labels = torch.stack([torch.stack([w["labels"][0], w["labels"][2], (w["labels"][1] % 4) + 1]) for w in want])
    with pytest.warns(UnmatchedBoxWarning):
        out = funcam.cam(sp, x, classes=boxes(ref, labels), relu=False)
    out = out._replace(maps=tuple(m.detach() for m in out.maps))
    oracle = _oracle(model, x, ref, labels)
    scale = max(float(o.abs().amax()) for o in oracle)
    assert scale > 0
    for got_l, want_l in zip(out.maps, oracle):
        assert got_l.shape == want_l.shape
        assert (got_l - want_l).abs().amax() <= 1e-5 * scale, float((got_l - want_l).abs().amax() / scale)
    reach = torch.stack([m.flatten(2).abs().amax(-1) for m in out.maps]).amax(0)  # (B, N) over the levels
    assert (reach[:, :2] > 0).all() and torch.equal(reach[:, 2], torch.zeros(2, dtype=torch.float64))
    # batched equals one box at a time
    for n in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnmatchedBoxWarning)
            one = funcam.cam(sp, x, classes=boxes(ref[:, n:n + 1], labels[:, n:n + 1]), relu=False).maps
        one = tuple(m.detach() for m in one)
        for a, o in zip(out.maps, one):
            assert (a[:, n:n + 1] - o).abs().amax() <= 1e-9 * scale


def test_roi_align_equals_torchvision():
    from torchvision.ops import MultiScaleRoIAlign, roi_align

    g = torch.Generator().manual_seed(2)
    f = torch.randn(2, 5, 13, 17, generator=g, dtype=torch.float64)
    bx = torch.tensor([[0., 0, 30, 20], [5, 3, 60, 50], [-3, 2, 10, 70], [10, 10, 10.5, 11], [50, 40, 90, 60]],
                      dtype=torch.float64)  # inside, beyond the border, tiny
    for aligned in (False, True):
        want = roi_align(f, [bx, bx[:2]], (7, 6), 0.25, 2, aligned)
        got = torch.cat([detection.roi_align(f[0], bx, (7, 6), 0.25, 2, aligned),
                         detection.roi_align(f[1], bx[:2], (7, 6), 0.25, 2, aligned)])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    levels = {str(i): torch.randn(2, 4, 64 // 2 ** i, 80 // 2 ** i, generator=g, dtype=torch.float64)
              for i in range(2, 6)}
    props = [torch.tensor([[0., 0, 250, 300], [10, 20, 40, 50], [5, 5, 120, 90]], dtype=torch.float64),
             torch.tensor([[30., 30, 60, 200]], dtype=torch.float64)]
    sizes = [(256, 320), (250, 300)]
    pool = MultiScaleRoIAlign(list(levels), 7, 2)
    want = pool(levels, props, sizes)
    torch.testing.assert_close(detection.multiscale_roi_align(list(levels.values()), props, sizes, (7, 7), 2), want,
                               rtol=1e-12, atol=1e-12)


def test_applies_only_to_detectors():
    import timm

    m = timm.create_model("resnet18", pretrained=False)
    assert not detection.applies(m) and not yolo.applies(m)
    with pytest.raises(ValueError, match="detection split"):
        detection.split(m)
    with pytest.raises(ValueError, match="yolo split"):
        yolo.split(m)


@pytest.mark.parametrize("name", ["tiny_fasterrcnn", "tiny_fcos", pytest.param("yolo11n", marks=pytest.mark.slow)])
def test_eigencam_per_level_is_pytorch_grad_cams_projection(name):
    # Eigen-CAM is class-agnostic (pytorch-grad-cam's YOLO / Faster R-CNN tutorials): per level, the first principal
    # component of the unmodified model's own activations (a forward hook), by pytorch-grad-cam's get_2d_projection,
    # with funcam's sign rule (correlate with the channel mean); the same map for every reference box
    from tests.core.test_projection import peer_projection, signed_like

    make, route = MODELS[name]
    model = make()
    sp = _split(route, model)
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        acts = [_hooked(model, x[b:b + 1]) for b in range(2)]
        ref = torch.stack([d["boxes"][:2] for _, d in acts])
        labels = torch.stack([d["labels"][:2] for _, d in acts])
        with warnings.catch_warnings():  # a box may match no detection: the class-agnostic map is drawn all the same
            warnings.simplefilter("ignore", UnmatchedBoxWarning)
            out = funcam.cam(sp, x, classes=boxes(ref, labels), method="eigencam", relu=False)
            rectified = funcam.cam(sp, x, classes=boxes(ref, labels), method="eigencam").maps  # the default: ReLU'd
    assert isinstance(out.maps, tuple) and len(out.maps) == len(acts[0][0]) > 1
    for lv, got in enumerate(out.maps):
        a = torch.cat([la[lv] for la, _ in acts])  # (B, C, h, w)
        want = signed_like(peer_projection(a), a)
        assert got.shape == (2, 2) + tuple(a.shape[2:])
        assert bool(want.abs().amax() > 0)
        for k in range(2):
            torch.testing.assert_close(got[:, k], want, rtol=1e-6, atol=1e-9 * float(want.abs().amax()))
        torch.testing.assert_close(rectified[lv], got.clamp_min(0), rtol=0, atol=0)
