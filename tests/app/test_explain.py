"""``funcam.explain.explain`` (funcam/_src/app/explain.py): its options reach ``funcam.cam``.

Which method each name runs is pinned in ``tests/test_methods.py``; here, the memory bound: ``max_memory`` is
passed through, chunks the classes, and leaves the maps as they are.
"""
from __future__ import annotations

import pytest
import torch

import funcam
from funcam.explain import explain
from tests.conftest import make_input, make_model, record_vmap_chunks

CLASSES = [3, 1, 4, 1, 5]  # K = 5 with a repeat
CASES = {  # name -> (family, method, what explain is given, the vmap chunk sizes recorded with max_memory=1)
    # resnet18's pooled head: the fast path maps chunk by chunk, one vmap per chunk
    "gradcampp-pooled": ("resnet18", "gradcampp", lambda m: m, [1] * 5),
    # the general path: one vmap over the classes, in chunks of one
    "layercam-general": ("resnet18", "layercam", lambda m: funcam.split(m)._replace(pooled=None), [1]),
    "chefer": ("vit_tiny_patch16_224", "chefer", lambda m: m, [1]),
    # its Guided Backprop vmap, then its Grad-CAM on the pooled head
    "guided-gradcam": ("resnet18", "guided-gradcam", lambda m: m, [1] + [1] * 5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_max_memory_chunks_the_classes_and_keeps_the_maps(case, monkeypatch, one_thread):
    family, method, target, chunked = CASES[case]
    model, x = target(make_model(family)), make_input(family)
    with record_vmap_chunks(monkeypatch) as seen:
        full = explain(model, x, method=method, classes=CLASSES)
    assert 1 not in seen, seen  # the default budget holds all five classes at once
    assert bool((full.maps != 0).any()), case
    with record_vmap_chunks(monkeypatch) as seen:
        got = explain(model, x, method=method, classes=CLASSES, max_memory=1)
    assert seen == chunked, seen  # a budget below one class's tensors: one class per chunk
    # float tolerance: the vmapped operands have other row counts per chunk (see tests/test_state.py)
    torch.testing.assert_close(got.maps, full.maps, rtol=0, atol=1e-5 * float(full.maps.abs().max()))
    assert torch.equal(got.classes, full.classes) and torch.equal(got.logits, full.logits)


@pytest.mark.parametrize("bad", [0, -1, "x", 1.5, True])
def test_bad_max_memory_is_a_value_error_naming_it(bad, one_thread):
    model, x = make_model("resnet18"), make_input("resnet18", batch=1)
    with pytest.raises(ValueError, match=f"max_memory must be None or a positive number of bytes, got {bad!r}"):
        explain(model, x, method="gradcam", classes=CLASSES, max_memory=bad)
