"""The route table (funcam/_src/cuts/route.py): which family route each model takes, the graph route last and for
any model, and the attention sources of two routes agreeing on the same model (the timm ViT's own recomputation
against the probabilities found in its captured graph)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import funcam
from funcam._src.cuts import auto, vit
from funcam._src.cuts.capture import SplitArgs
from funcam._src.cuts.route import ROUTES, attention_source, route_for
from tests.conftest import make_input, make_model, tv_model


@pytest.mark.parametrize("name,want", [
    ("resnet18", "timm-maps"), ("convnext_atto", "timm-maps"), ("vgg11", "timm-maps"),
    ("vit_tiny_patch16_224", "timm-vit"), ("deit_tiny_distilled_patch16_224", "timm-vit"),
    ("swin_tiny_patch4_window7_224", "timm-swin"),
])
def test_timm_families_take_their_route(name, want):
    model = make_model(name)
    assert route_for(model, SplitArgs()).name == want
    assert route_for(model, SplitArgs(layer=("x",))).name == "graph"  # a named cut is always the graph's


def test_the_graph_route_is_last_and_takes_any_model():
    assert ROUTES[-1].name == "graph"
    tv = tv_model("resnet18", num_classes=5)
    assert route_for(tv, SplitArgs()).name == "graph"
    assert route_for(nn.Sequential(nn.Conv2d(3, 2, 1)), SplitArgs()).name == "graph"


def test_token_cut_on_a_model_without_blocks_names_the_families():
    with pytest.raises(ValueError, match="token_cut='norm1' applies to timm ViT and Swin models only, got a ResNet"):
        funcam.split(make_model("resnet18"), token_cut="norm1")


def test_each_route_splits_as_the_model_computes():
    # the narrow Swin (64 px, two stages): the full swin_tiny at 224 px took 15 s of the fast set's minutes
    for name in ("resnet18", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224-narrow"):
        model, x = make_model(name), make_input(name, batch=1)
        for r in ROUTES:
            if r.applies(model, SplitArgs()):
                sp = r.split(model, SplitArgs())
                with torch.no_grad():
                    torch.testing.assert_close(sp.head(sp.extract(x)), model(x), rtol=1e-4, atol=1e-5)


def test_vit_attention_equals_the_graph_routes_on_the_same_model():
    model, x = make_model("vit_tiny_patch16_224"), make_input("vit_tiny_patch16_224", batch=1)
    own = vit.attention(model, x)
    found = auto.attention(model, x)
    assert own is not None and attention_source(model, x).run is not found.run
    with torch.no_grad():
        out1, p1 = own.run(x, None)
        out2, p2 = found.run(x, None)
    torch.testing.assert_close(out1, out2, rtol=1e-4, atol=1e-5)
    assert len(p1) == len(p2) == own.layers == found.layers == len(model.blocks)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert (own.prefix, own.grid) == (found.prefix, found.grid) == (1, (4, 4))
    torch.testing.assert_close(own.readout, found.readout)


def test_swin_has_no_attention_of_its_own_and_the_graph_route_says_why():
    name = "swin_tiny_patch4_window7_224-narrow"  # 64 px, shifted windows in both stages
    model, x = make_model(name), make_input(name, batch=1)
    assert ROUTES[1].attention(model, x, None) is None
    with pytest.raises(ValueError, match="within windows"):
        attention_source(model, x)
