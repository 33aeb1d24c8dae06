"""CLIP image towers (open_clip ResNet and ViT, Hugging Face CLIPVisionModelWithProjection and CLIPModel), random
weights, tiny configs: the clip route's split and the graph route against a forward hook on the unmodified model,
K prompts in one call, in float64."""
from __future__ import annotations

import warnings

import pytest
import torch
from einops import rearrange

import funcam
from funcam._src.cuts import clip
from funcam.targets import prompts

TEXT = dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1)


def _open_clip(kind: str):
    import open_clip

    torch.manual_seed(0)
    vision = (dict(layers=(1, 1, 1, 1), width=16, image_size=64, head_width=16) if kind == "resnet" else
              dict(layers=2, width=32, patch_size=16, image_size=64, head_width=16))
    return open_clip.CLIP(32, vision, TEXT).double().eval()


def _hf(kind: str):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=64, patch_size=16, projection_dim=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny text vocabulary's token-id warnings
        if kind == "vision":
            return CLIPVisionModelWithProjection(vc).double().eval()
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100,
                    max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vc.to_dict(), projection_dim=24)).double().eval()


# name -> (model factory, the module whose output is the cut, how its output becomes (B, C, h, w), the cut's name,
# the embedding of the model's own output)
def _tokens(t, x):
    g = x.shape[-1] // 16
    return rearrange(t[:, 1:], "b (h w) c -> b c h w", h=g, w=g)


TOWERS = {
    "open_clip_resnet": (lambda: _open_clip("resnet"), lambda m: m.visual.layer4, lambda a, x: a, "layer4"),
    "open_clip_vit": (lambda: _open_clip("vit"), lambda m: m.visual.transformer.resblocks[-1].ln_1, _tokens,
                      "transformer.resblocks.1.ln_1"),
    "hf_vision": (lambda: _hf("vision"), lambda m: m.vision_model.encoder.layers[-1].layer_norm1, _tokens,
                  "vision_model.encoder.layers.1.layer_norm1"),
    "hf_clip": (lambda: _hf("clip"), lambda m: m.vision_model.encoder.layers[-1].layer_norm1, _tokens,
                "vision_model.encoder.layers.1.layer_norm1"),
}


def _embed(model, x):
    """The model's image embedding (B, D) by its own API."""
    if hasattr(model, "encode_image"):
        return model.encode_image(x)
    if hasattr(model, "get_image_features"):
        out = model.get_image_features(x)
        return getattr(out, "pooler_output", out)
    return model(x).image_embeds


def _text(model, k: int):
    """K prompt embeddings from the model's own text tower (random token ids) and its logit scale."""
    g = torch.Generator().manual_seed(k)
    if hasattr(model, "encode_text"):
        tokens = torch.randint(2, 50, (k, 8), generator=g)
        return model.encode_text(tokens).detach(), model.logit_scale.exp().detach()
    if hasattr(model, "get_text_features"):
        out = model.get_text_features(torch.randint(2, 100, (k, 6), generator=g))
        return getattr(out, "pooler_output", out).detach(), model.logit_scale.exp().detach()
    return torch.randn(k, 24, generator=g, dtype=torch.float64), 50.0


def _oracle(model, layer, to_map, x, score):
    """Raw Grad-CAM (B, K, h, w) from one autograd.grad per image and prompt at a forward hook on ``layer`` of the
    unmodified model, scored on the model's own embedding."""
    maps = []
    for b in range(x.shape[0]):
        xb, seen = x[b:b + 1], []
        handle = layer.register_forward_hook(lambda mod, inp, out, seen=seen: seen.append(out) or out.clone())
        try:
            s = score(_embed(model, xb))[0]
        finally:
            handle.remove()
        (a,) = seen
        am = to_map(a, xb)
        row = []
        for k in range(s.shape[0]):
            (g,) = torch.autograd.grad(s[k], a, retain_graph=True)
            row.append((to_map(g, xb).mean(dim=(2, 3), keepdim=True) * am).sum(dim=1)[0])
        maps.append(torch.stack(row))
    return torch.stack(maps).detach()


def _close(got, want, tol=1e-5):
    scale = want.abs().amax()
    assert scale > 0, "the oracle's maps are all zero"
    assert got.shape == want.shape, (got.shape, want.shape)
    assert (got - want).abs().amax() <= tol * scale, float((got - want).abs().amax() / scale)


@pytest.fixture(scope="module", params=sorted(TOWERS))
def tower(request):
    make, layer, to_map, name = TOWERS[request.param]
    return request.param, make(), layer, to_map, name


def test_the_clip_split_reproduces_the_embedding(tower):
    kind, model, _, _, name = tower
    assert clip.applies(model)
    sp = clip.split(model)
    assert sp.layers == (name,)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(sp.head(sp.extract(x)), _embed(model, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [3, 20])  # K < hw / 16: one vmapped vjp; more: forward mode over the grid's positions
def test_prompt_maps_equal_a_hooked_autograd_loop(tower, k):
    kind, model, layer, to_map, _ = tower
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    text, scale = _text(model, k)
    score = prompts(text, logit_scale=scale)
    want = _oracle(model, layer(model), to_map, x, score)
    sp = clip.split(model)
    out = funcam.cam(sp, x, classes=score, relu=False)
    _close(out.maps, want)
    torch.testing.assert_close(out.logits, _embed(model, x).detach(), rtol=1e-10, atol=1e-12)
    # batched equals one call per prompt
    loop = torch.cat([funcam.gradcam(sp, x, prompts(text[i:i + 1], logit_scale=scale), relu=False)
                      for i in range(0, k, max(1, k // 4))], dim=1)
    _close(out.maps[:, ::max(1, k // 4)], loop, 1e-9)


@pytest.mark.slow  # a graph capture per tower
def test_the_graph_route_gives_the_same_maps(tower):
    """funcam.split of the tower (the graph route, no clip route) cuts at the same place: the same maps."""
    kind, model, _, _, name = tower
    module = clip.split(model).module  # the tower, or a CLIPModel's image features
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    graph = funcam.split(module, example=x)
    assert graph.layers in ((name,), ("model." + name,))
    text, scale = _text(model, 5)
    score = prompts(text, logit_scale=scale)
    _close(funcam.gradcam(clip.split(model), x, score, relu=False), funcam.gradcam(graph, x, score, relu=False), 1e-9)


@pytest.mark.slow  # a graph capture per tower
@pytest.mark.parametrize("kind", ["open_clip_vit", "hf_vision"])
def test_chefer_relevance_for_prompts(kind):
    """Attention relevance for K prompts through the split's tower: batched equals one call per prompt."""
    model = TOWERS[kind][0]()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    text, scale = _text(model, 3)
    sp = clip.split(model)
    rel = funcam.chefer_relevance(sp, x, prompts(text, logit_scale=scale))
    assert rel.shape == (2, 3, 4, 4) and bool((rel.flatten(2).amax(-1) > 0).all())
    for i in range(3):
        one = funcam.chefer_relevance(sp, x, prompts(text[i:i + 1], logit_scale=scale))
        torch.testing.assert_close(rel[:, i:i + 1], one, rtol=1e-9, atol=1e-12)


def test_applies_only_to_its_forms():
    import open_clip
    import timm

    torch.manual_seed(0)
    avg = open_clip.CLIP(32, dict(layers=1, width=32, patch_size=16, image_size=64, head_width=16, pool_type="avg"),
                         TEXT)
    assert not clip.applies(avg) and not clip.applies(timm.create_model("resnet18", pretrained=False))
    with pytest.raises(ValueError, match="clip split"):
        clip.split(avg)
