"""The method table (funcam/_src/core/methods.py): one entry per method, and every public way to name a method
reaches that entry (``funcam.cam``, ``funcam.METHODS``, the explain names, the command line's spelling)."""
from __future__ import annotations

import pytest
import torch

import funcam
from funcam._src.core import methods
from funcam.explain import METHOD_NAMES, explain
from tests.conftest import make_input, make_model


def test_every_entry_is_complete_for_its_kind():
    assert len({m.title for m in methods.TABLE.values()}) == len(methods.TABLE)
    for name, m in methods.TABLE.items():
        assert name == m.name and m.kind in methods.KINDS and m.title and m.reference
        if m.kind == "cam":
            assert callable(m.rule) and callable(m.pooled), name
        elif m.kind == "relevance":
            assert callable(m.rule), name
        else:
            assert m.rule is None and m.weights is None and m.pooled is None, name
    assert [n for n, m in methods.TABLE.items() if m.mean] == ["gradcam"]  # only Grad-CAM is a spatial mean


def test_public_lists_come_from_the_table():
    assert funcam.METHODS == methods.CAM_METHODS == tuple(n for n, m in methods.TABLE.items() if m.kind == "cam")
    assert METHOD_NAMES == tuple(methods.cli_name(n) for n in methods.TABLE)


@pytest.mark.parametrize("name", list(methods.TABLE))
def test_both_spellings_find_the_entry(name):
    assert methods.get(name) is methods.TABLE[name]
    assert methods.get(methods.cli_name(name)) is methods.TABLE[name]


@pytest.mark.parametrize("bad,near", [("gradcam++", "gradcampp"), ("grad-cam", "gradcam"), ("Chefer", "chefer"),
                                      (3, None), (None, None)])
def test_unknown_method_names_the_valid_ones(bad, near):
    with pytest.raises(ValueError, match="method must be one of gradcam, gradcam_max") as e:
        methods.get(bad)
    assert repr(bad) in str(e.value)
    if near:
        assert f"did you mean {near!r}" in str(e.value)
    with pytest.raises(ValueError, match="one of gradcam, gradcam-max"):
        methods.get(bad, spell=methods.cli_name)


@pytest.mark.parametrize("name", [n for n, m in methods.TABLE.items() if m.kind != "rollout"])
def test_cam_and_explain_run_every_entry_by_either_name(name, one_thread):
    family = "vit_tiny_patch16_224" if methods.TABLE[name].kind == "relevance" else "resnet18"
    model, x = make_model(family), make_input(family)
    with torch.no_grad():
        want = funcam.cam(model, x, [1, 3], method=name).maps.detach()
    assert bool((want != 0).any()), name
    if methods.TABLE[name].kind == "guided":  # explain shows (B, K, H, W): the largest |gradient| over colours
        want = want.abs().amax(dim=2)
    torch.testing.assert_close(explain(model, x, method=methods.cli_name(name), classes=[1, 3]).maps, want)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
@pytest.mark.parametrize("name", list(methods.TABLE))
def test_every_method_refuses_a_bad_max_memory(name, bad, one_thread):
    family = "vit_tiny_patch16_224" if methods.TABLE[name].kind in ("relevance", "rollout") else "resnet18"
    model, x = make_model(family), make_input(family)
    calls = [lambda **o: funcam.cam(model, x, [1, 2], method=name, **o),
             lambda **o: explain(model, x, method=methods.cli_name(name), classes=[1, 2], **o)]
    if methods.TABLE[name].kind != "rollout":  # attention_rollout is class-agnostic and takes neither option
        shortcut = getattr(funcam, {"chefer": "chefer_relevance"}.get(name, name))
        calls.append(lambda **o: shortcut(model, x, [1, 2], **o))
    for call in calls:
        for opts in ({}, {"chunk_size": 1}):  # checked even where chunk_size decides
            with pytest.raises(ValueError, match=r"max_memory must be None or a positive number of bytes"):
                call(max_memory=bad, **opts)
