"""Rendering: colormaps equal matplotlib's (the oracle) at sample points, signed maps centre 0 on white,
overlay arithmetic on a tiny image, grids and PNG files."""
import numpy as np
import pytest
import torch

from funcam._src.app.render import save_png, to_uint8
from funcam.render import (
    CMAPS,
    colorbar,
    colorize,
    colormap_table,
    draw_boxes,
    gradient_image,
    grid,
    legend_labels,
    overlay,
)

mpl = pytest.importorskip("matplotlib")
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

TOL = 1 / 255 + 1e-9


def _ours(values: torch.Tensor, cmap: str, **kw) -> np.ndarray:
    """(n,) values -> (n, 3) colours in [0, 1] through colorize."""
    out = colorize(values.view(1, 1, 1, -1), cmap, **kw)
    assert out.dtype == torch.uint8 and out.shape == (1, 1, 3, 1, values.numel())
    return out[0, 0, :, 0].T.double().numpy() / 255


@pytest.mark.parametrize("cmap", [c for c in CMAPS if c != "bwr"])
def test_colormap_equals_matplotlib(cmap):
    t = torch.cat([torch.linspace(0, 1, 1001, dtype=torch.float64),
                   torch.rand(500, generator=torch.Generator().manual_seed(0), dtype=torch.float64)])
    ref = mpl.colormaps[cmap](t.numpy())[:, :3]
    np.testing.assert_allclose(_ours(t, cmap, vmin=0, vmax=1), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("cmap", CMAPS)
def test_table_equals_matplotlib_lut(cmap):
    ref = mpl.colormaps[cmap](np.arange(256) / 255)[:, :3]
    np.testing.assert_allclose(colormap_table(cmap).double().numpy(), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("lo,hi", [(-3.0, 2.0), (-0.1, 5.0), (-4.0, 0.25)])
def test_bwr_is_two_slope_norm_with_zero_white(lo, hi):
    g = torch.Generator().manual_seed(1)
    v = torch.cat([torch.tensor([lo, 0.0, hi]), torch.rand(200, generator=g) * (hi - lo) + lo]).double()
    ref = mpl.colormaps["bwr"](TwoSlopeNorm(vcenter=0, vmin=lo, vmax=hi)(v.numpy()))[:, :3]
    ours = _ours(v, "bwr")  # default range: the map's own min and max, as TwoSlopeNorm autoscales
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(ours[1], [1, 1, 1], atol=TOL)   # 0 -> white, whatever the asymmetry
    np.testing.assert_allclose(ours[0], [0, 0, 1], atol=TOL)   # the minimum -> full blue
    np.testing.assert_allclose(ours[2], [1, 0, 0], atol=TOL)   # the maximum -> full red


def test_bwr_all_positive_map_starts_at_white():
    ours = _ours(torch.tensor([0.0, 1.0, 2.0]), "bwr")
    ref = mpl.colormaps["bwr"](np.array([0.5, 0.75, 1.0]))[:, :3]  # the range widens to [0, 2]: 0 -> centre
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(ours[0], [1, 1, 1], atol=TOL)


def test_default_range_is_per_map_and_batch_equals_loop():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 3, 4, 5, generator=g) * torch.arange(1, 7).view(2, 3, 1, 1)
    out = colorize(maps, "turbo")
    for b in range(2):
        for k in range(3):
            m = maps[b, k]
            one = colorize(m[None, None], "turbo", vmin=float(m.min()), vmax=float(m.max()))[0, 0]
            assert torch.equal(out[b, k], one)
            ref = mpl.colormaps["turbo"](((m - m.min()) / (m.max() - m.min())).numpy())[..., :3]
            np.testing.assert_allclose(out[b, k].permute(1, 2, 0).numpy() / 255, ref, atol=TOL)
    assert out.float().std() > 10  # not a flat picture


def test_vmin_vmax_tensor_and_constant_map():
    maps = torch.tensor([[[[0.0, 1.0]], [[2.0, 2.0]]]])  # (1, 2, 1, 2); the second map is constant
    out = colorize(maps, "hot", vmin=torch.tensor([[0.0, 0.0]]), vmax=torch.tensor([[2.0, 4.0]]))
    ref = mpl.colormaps["hot"](np.array([0, 0.5, 0.5, 0.5]))[:, :3]
    np.testing.assert_allclose(out[0].permute(0, 3, 2, 1).reshape(4, 3).numpy() / 255, ref, atol=TOL)
    const = colorize(torch.full((1, 1, 2, 2), 7.0), "viridis")  # matplotlib Normalize: constant -> 0
    assert (const == colorize(torch.zeros(1, 1, 1, 1), "viridis", vmin=0, vmax=1)[..., :1, :1]).all()


def test_overlay_arithmetic_on_tiny_image():
    img = torch.tensor([[[0, 255], [100, 50]], [[10, 20], [30, 40]], [[200, 0], [255, 128]]],
                       dtype=torch.uint8)[None]                                    # (1, 3, 2, 2)
    maps = torch.tensor([[[[0.0, 1.0], [0.25, 0.5]], [[4.0, 3.0], [2.0, 1.0]]]])      # (1, 2, 2, 2)
    alpha = 0.3
    out = overlay(img, maps, alpha=alpha, cmap="jet")
    assert out.shape == (1, 2, 3, 2, 2) and out.dtype == torch.uint8
    for k in range(2):
        m = maps[0, k].numpy()
        heat = np.round(mpl.colormaps["jet"]((m - m.min()) / (m.max() - m.min()))[..., :3] * 255)  # (2, 2, 3)
        want = (1 - alpha) * img[0].permute(1, 2, 0).numpy() + alpha * heat
        np.testing.assert_allclose(out[0, k].permute(1, 2, 0).numpy(), want, atol=1.0)  # rounding + 1/255 table


def test_overlay_undoes_normalisation_and_upsamples():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=g)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = (img.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.equal(to_uint8(x, mean=mean, std=std), img)
    maps = torch.rand(2, 3, 2, 2, generator=g)
    a = overlay(img, maps, alpha=0.6, cmap="viridis")
    b = overlay(x, maps, alpha=0.6, cmap="viridis", mean=mean, std=std)
    assert torch.equal(a, b) and a.shape == (2, 3, 3, 8, 8)
    assert torch.equal(overlay(img, maps, alpha=0.0), img[:, None].expand(-1, 3, -1, -1, -1))
    up = torch.nn.functional.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.equal(overlay(img, up, alpha=1.0), colorize(up, "jet"))


def test_grid_places_tiles_and_draws_labels(tmp_path):
    tiles = torch.arange(2 * 3, dtype=torch.uint8).mul(40).view(2, 3, 1, 1, 1).expand(2, 3, 3, 10, 12).contiguous()
    g = grid(tiles, pad=2)
    assert g.shape == (3, 2 + 2 * 12, 2 + 3 * 14)
    for i in range(2):
        for j in range(3):
            assert (g[:, 2 + i * 12:2 + i * 12 + 10, 2 + j * 14:2 + j * 14 + 12] == 40 * (3 * i + j)).all()
    labelled = grid(tiles, pad=2, row_labels=["Grad-CAM", "Grad-CAM++"], col_labels=["input", "cat", "dog"],
                    label_size=16, row_label_width=60)
    assert labelled.shape == (3, 16 + g.shape[1], 60 + g.shape[2])
    assert torch.equal(labelled[:, 16:, 60:], g)
    assert (labelled[:, :16, 60:] < 128).any() and (labelled[:, 16:, :60] < 128).any()  # text was drawn
    path = save_png(labelled, tmp_path / "g.png")
    from PIL import Image

    with Image.open(path) as im:
        assert torch.equal(torch.from_numpy(np.array(im)).permute(2, 0, 1), labelled)
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]  # no temporary file left behind


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="cmap must be one of jet, turbo, hot, viridis, bwr; got 'parula'"):
        colorize(torch.zeros(1, 1, 2, 2), "parula")
    with pytest.raises(ValueError, match=r"maps must be a \(B, K, h, w\) tensor, got \(2, 2\)"):
        colorize(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="alpha must lie in"):
        overlay(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.zeros(1, 1, 2, 2), alpha=1.5)
    with pytest.raises(ValueError, match=r"B = 1"):
        overlay(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="both mean and std"):
        to_uint8(torch.zeros(1, 3, 2, 2), mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="row_labels must have 2 entries, got 1"):
        grid(torch.zeros(2, 1, 3, 4, 4, dtype=torch.uint8), row_labels=["a"])
    with pytest.raises(ValueError, match=r"uint8 \(3, H, W\)"):
        save_png(torch.zeros(3, 4, 4), "x.png")


def test_gradient_image_equals_deprocess_image():
    # issue 16: Guided Backprop / Guided Grad-CAM went through a heat colormap and looked near-uniform blue.
    # The papers draw the gradient itself; the oracle is keras-grad-cam's / pytorch-grad-cam's deprocess_image
    # (mean to mid-grey, 0.1 per standard deviation), applied map by map.
    deprocess = pytest.importorskip("pytorch_grad_cam.utils.image").deprocess_image
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1e-4, 1.0, 30.0], dtype=torch.float64).view(1, 3, 1, 1, 1)
    grads = torch.randn(2, 3, 3, 9, 7, generator=g, dtype=torch.float64) * scale
    grads[1, 2] = 0  # a zero gradient: uniform grey, no NaN
    out = gradient_image(grads)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 3, 9, 7)
    for b in range(2):
        for k in range(3):
            want = deprocess(grads[b, k].permute(1, 2, 0).numpy())  # (H, W, 3)
            got = out[b, k].permute(1, 2, 0).numpy()
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # float32 here, float64 there
    assert (out[1, 2] == 127).all()
    assert abs(out[0, 1].float().mean().item() - 127) < 3 and out[0, 1].float().std() > 15  # grey, with detail
    one = gradient_image(grads[:, :, :1])  # a channel-reduced map: the same grey image on all three channels
    assert torch.equal(one[:, :, 0], one[:, :, 2])
    with pytest.raises(ValueError, match=r"\(B, K, 3, H, W\)"):
        gradient_image(torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("cmap", CMAPS)
def test_colorbar_shows_the_colormap_as_colorize_draws_it(cmap):
    bar = colorbar(cmap, 300, bar_height=6, label_height=16)
    assert bar.dtype == torch.uint8 and bar.shape == (3, 22, 300)
    t = torch.linspace(0, 1, 300, dtype=torch.float64)
    ref = mpl.colormaps[cmap](np.minimum((t.numpy() * 256).astype(int), 255))[:, :3]  # matplotlib's lookup
    for row in range(6):
        np.testing.assert_allclose(bar[:, row].T.double().numpy() / 255, ref, atol=TOL, rtol=0)
    # left end = colorize's colour for a map's minimum, right end = its maximum
    ends = colorize(torch.tensor([[[[0.0, 1.0]]]]), cmap) if cmap != "bwr" else \
        colorize(torch.tensor([[[[-1.0, 1.0]]]]), cmap)
    assert torch.equal(bar[:, 0, 0], ends[0, 0, :, 0, 0]) and torch.equal(bar[:, 0, -1], ends[0, 0, :, 0, 1])
    labels = bar[:, 6:]
    assert (labels < 128).any() and (labels[:, :, :100] < 128).any() and (labels[:, :, -100:] < 128).any()
    assert legend_labels(cmap) == (("most negative", "0", "most positive") if cmap == "bwr"
                                   else ("map minimum", "map maximum"))


def test_grid_legend_sits_under_the_tiles():
    tiles = torch.full((2, 3, 3, 10, 12), 40, dtype=torch.uint8)
    plain = grid(tiles, pad=2, row_labels=["a", "b"], row_label_width=30)
    with_bar = grid(tiles, pad=2, row_labels=["a", "b"], row_label_width=30, legend="viridis")
    bar = colorbar("viridis", 3 * 14 - 2)
    assert with_bar.shape == (3, plain.shape[1] + bar.shape[1] + 2, plain.shape[2])
    assert torch.equal(with_bar[:, :plain.shape[1]], plain)
    left = 30 + 2  # aligned with the first tile column, not the row labels
    assert torch.equal(with_bar[:, plain.shape[1]:plain.shape[1] + bar.shape[1], left:left + bar.shape[2]], bar)
    assert (with_bar[:, plain.shape[1]:, :left] == 255).all()


def test_save_png_leaves_nothing_when_the_write_fails(tmp_path, monkeypatch):
    import errno

    from PIL import Image

    def full(self, fp, *args, **kwargs):  # half a file, then the disk is full
        fp.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(OSError) as err:
        save_png(torch.zeros(3, 4, 4, dtype=torch.uint8), tmp_path / "x.png")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_draw_boxes_outlines_each_box_on_its_image():
    # hand-drawn golden: box (2, 1, 8, 7) on an 8 x 10 image of 100s: a 2-pixel white ring just inside the edges,
    # a black ring just outside; a box past the image's edges is drawn where it lies inside; the input is unchanged
    images = torch.full((2, 3, 8, 10), 100, dtype=torch.uint8)
    out = draw_boxes(images, torch.tensor([[2.0, 1, 8, 7], [-3, -2, 4, 20]]))
    golden = torch.full((8, 10), 100, dtype=torch.uint8)
    golden[0, 1:9] = golden[7, 1:9] = golden[:, 1] = golden[:, 8] = 0
    golden[1:7, 2:8] = 255
    golden[3:5, 4:6] = 100
    assert (out[0] == golden).all() and bool((images == 100).all())
    assert (out[1, :, :, 2:4] == 255).all() and (out[1, :, :, 4] == 0).all() and (out[1, :, :, 5:] == 100).all()
    assert (out[1, :, :, :2] == 100).all()
    with pytest.raises(ValueError, match="boxes"):
        draw_boxes(images, torch.zeros(3, 4))
