"""Axis roles (funcam/_src/cuts/layout.py) on small captured graphs whose layouts are known by construction: each
module below rearranges an image in one documented way, and the roles of its output (and the ``Layout`` read from
them) must say where the batch, the channels, the rows, the columns or the tokens went. The maps a layout gives
back (``to_map``) are compared with the same rearrangement written with einops."""
from __future__ import annotations

import pytest
import torch
from einops import rearrange
from torch import nn

from funcam._src.cuts.capture import capture
from funcam._src.cuts.graph import to_map
from funcam._src.cuts.layout import H0, W0, B, C, Layout, U, layout_of, merge, propagate


class Rearranged(nn.Module):
    """conv (3 -> 4 channels, stride 2) then one rearrangement ``how`` of the (B, 4, h, w) map."""

    def __init__(self, how: str, prefix: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.how, self.prefix = how, prefix
        self.cls = nn.Parameter(torch.randn(1, prefix, 4)) if prefix else None

    def forward(self, x):
        a = self.conv(x)
        if self.how == "nhwc":
            return a.permute(0, 2, 3, 1)
        if self.how == "tokens":
            t = a.flatten(2).transpose(1, 2)  # (B, h*w, C)
            if self.prefix:
                t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1)
            return t
        if self.how == "pooled":
            return a.mean((2, 3))
        if self.how == "rolled":
            return torch.roll(a, shifts=(1, 1), dims=(2, 3))
        return a


def _out_roles(model: nn.Module, x: torch.Tensor):
    cap = capture(model, x)
    roles = propagate(cap.graph, cap.x, cap.bsym)
    (out,) = cap.outputs
    return roles[out], tuple(out.meta["val"].shape)


@pytest.mark.parametrize("how,want", [
    ("nchw", Layout(4, 0, 1, 2, 3, grid=(4, 6))),
    ("nhwc", Layout(4, 0, 3, 1, 2, grid=(4, 6))),
    ("tokens", Layout(3, 0, 2, token=1, prefix=0, grid=(4, 6))),
])
def test_layouts_of_known_rearrangements(how, want):
    torch.manual_seed(0)
    model = Rearranged(how).eval()
    x = torch.randn(2, 3, 8, 12)
    roles, shape = _out_roles(model, x)
    got = layout_of(roles, shape)
    assert got == want
    # and the map it gives back is the conv's output, whatever the layout
    v = model(x)
    fmap, prefix = to_map(v, got)
    torch.testing.assert_close(fmap, model.conv(x), rtol=0, atol=0)
    assert prefix is None


def test_prefix_tokens_are_counted_and_split_off():
    torch.manual_seed(0)
    model = Rearranged("tokens", prefix=2).eval()
    x = torch.randn(2, 3, 8, 8)
    roles, shape = _out_roles(model, x)
    lay = layout_of(roles, shape)
    assert lay == Layout(3, 0, 2, token=1, prefix=2, grid=(4, 4))
    fmap, prefix = to_map(model(x), lay)
    torch.testing.assert_close(fmap, model.conv(x))
    torch.testing.assert_close(prefix, model.cls.expand(2, -1, -1))
    assert rearrange(fmap, "b c h w -> b (h w) c").shape == (2, 16, 4)


def test_a_pooled_vector_and_a_rolled_map_are_no_feature():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    roles, shape = _out_roles(Rearranged("pooled").eval(), x)
    assert roles == [B, C] and layout_of(roles, shape) is None
    roles, shape = _out_roles(Rearranged("rolled").eval(), x)
    # a cyclic shift keeps the axes but not their alignment with the image: rows / columns with a shift
    assert roles[0] == B and roles[2][0] == "h" and roles[2] != H0 and roles[3] != W0
    assert layout_of(roles, shape) is None


def test_merge_rules():
    assert merge([H0, C]) == H0  # a position embedding added to tokens is aligned with them
    assert merge([H0, U]) == H0  # a residual stream is aligned even when the branch's roles were lost
    assert merge([H0, W0]) == U  # two different grid roles: unknown
    assert merge([C, C]) == C and merge([U, C]) == U
