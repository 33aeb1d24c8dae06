"""The method table (funcam/_src/core/methods.py): one entry per method, and every public way to name a method
reaches that entry (``funcam.cam``, ``funcam.METHODS``, the explain names, the command line's spelling)."""
from __future__ import annotations

import pytest
import torch

import funcam
from funcam._src.core import methods
from funcam._src.core.weighted import GradientCAM, rule_of
from funcam.explain import METHOD_NAMES, explain
from tests.conftest import make_input, make_model, quick_options


def test_every_entry_is_complete():
    assert len({m.title for m in methods.TABLE.values()}) == len(methods.TABLE)
    for name, m in methods.TABLE.items():
        assert name == m.name and m.title and m.reference and m.use and callable(m.compute), name
        assert m.needs in methods.NEEDS and m.output in methods.OUTPUTS and m.fold in methods.FOLDS, name
        assert len({o.name for o in m.options}) == len(m.options), name
        for o in m.options:  # every default passes its own check, and the check is the value's identity there
            assert o.check(o.default) == o.default and o.help, (name, o.name)
        rule = rule_of(m.compute)
        if name in methods.CAM_METHODS:
            assert callable(rule.per_class) and callable(rule.pooled) and m.needs == "split", name
    means = [n for n, m in methods.TABLE.items() if rule_of(m.compute) is not None and rule_of(m.compute).mean]
    assert means == ["gradcam"]  # only Grad-CAM is a spatial mean


def test_public_lists_come_from_the_table():
    assert funcam.METHODS == methods.CAM_METHODS == tuple(
        n for n, m in methods.TABLE.items() if isinstance(m.compute, GradientCAM))
    assert METHOD_NAMES == tuple(methods.cli_name(n) for n in methods.TABLE)


def test_every_method_has_a_shortcut_documented_from_its_entry():
    for name, m in methods.TABLE.items():
        fn = getattr(funcam, SHORTCUTS.get(name, name))
        assert m.title in fn.__doc__ and m.reference in fn.__doc__, name
        for o in m.options:
            assert o.name in fn.__doc__, (name, o.name)


def test_an_option_a_method_does_not_take_is_refused_by_name():
    model, x = make_model("resnet18"), make_input("resnet18")
    with pytest.raises(TypeError, match=r"method 'gradcam' has no option 'rleu'.*did you mean 'relu'"):
        funcam.cam(model, x, method="gradcam", rleu=False)
    with pytest.raises(TypeError, match=r"method 'guided_backprop' has no option 'relu' \(it takes no options"):
        funcam.cam(model, x, method="guided_backprop", relu=False)
    with pytest.raises(TypeError, match=r"relu must be True or False, got 0"):
        funcam.gradcam(model, x, relu=0)


def test_layer_is_refused_where_it_cannot_apply():
    model, x = make_model("resnet18"), make_input("resnet18")
    with pytest.raises(ValueError, match=r"layer= does not apply to method 'guided_backprop'.*layer='layer3'"):
        funcam.cam(model, x, method="guided_backprop", layer="layer3")
    with pytest.raises(ValueError, match=r"layer= does not apply to method 'guided_backprop'"):
        explain(model, x, method="guided-backprop", layer="layer3")
    with pytest.raises(ValueError, match=r"give layer= to funcam.split"):
        funcam.cam(funcam.split(model), x, layer="layer3")
    vit, xv = make_model("vit_tiny_patch16_224"), make_input("vit_tiny_patch16_224")
    for name in ("rollout", "chefer", "grad_rollout"):
        with pytest.raises(ValueError, match=f"layer= does not apply to method {name!r}"):
            explain(vit, xv, method=name, layer="blocks.0")


def test_layer_cuts_the_model_for_the_methods_at_a_cut():
    model, x = make_model("resnet18"), make_input("resnet18")
    with torch.no_grad():
        want = funcam.gradcam(funcam.split(model, "layer3"), x, [1, 2])
        got = funcam.cam(model, x, [1, 2], layer="layer3").maps
    assert bool((want != 0).any()) and want.shape[-1] == 4
    torch.testing.assert_close(got, want, rtol=0, atol=0)


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


SHORTCUTS = {"chefer": "chefer_relevance"}  # the public names that differ from the method's


# Score-CAM, SS-CAM and IS-CAM cost C masked forwards per call: their own tests (test_perturbation) run them
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("scorecam", "sscam", "iscam") else n
                                  for n, m in methods.TABLE.items() if not m.agnostic])
def test_cam_and_explain_run_every_entry_by_either_name(name, one_thread):
    family = "vit_tiny_patch16_224" if methods.TABLE[name].needs == "attention" else "resnet18"
    model, x = make_model(family), make_input(family)
    # the methods that draw noise draw the same from a generator seeded alike (quick_options)
    with torch.no_grad():
        want = funcam.cam(model, x, [1, 3], method=name, **quick_options(name)).maps.detach()
    assert bool((want != 0).any()), name
    if methods.TABLE[name].output == "input":  # explain shows (B, K, H, W), folded over colours as the entry says
        want = want.abs().amax(dim=2) if methods.TABLE[name].fold == "absmax" else want.sum(dim=2)
    got = explain(model, x, method=methods.cli_name(name), classes=[1, 3], **quick_options(name)).maps
    torch.testing.assert_close(got, want)


# every method with one bad value in the fast set (the request is parsed at funcam.cam, before any method runs);
# all four bad values on every method in the slow set
@pytest.mark.parametrize("bad", [0] + [pytest.param(v, marks=pytest.mark.slow) for v in (-1, True, 1.5)])
@pytest.mark.parametrize("name", list(methods.TABLE))
def test_every_method_refuses_a_bad_max_memory(name, bad, one_thread):
    family = "vit_tiny_patch16_224" if methods.TABLE[name].needs == "attention" else "resnet18"
    model, x = make_model(family), make_input(family)
    calls = [lambda **o: funcam.cam(model, x, [1, 2], method=name, **o),
             lambda **o: explain(model, x, method=methods.cli_name(name), classes=[1, 2], **o)]
    shortcut = getattr(funcam, SHORTCUTS.get(name, name))
    calls.append(lambda **o: shortcut(model, x, [1, 2], **o))
    for call in calls:
        for opts in ({}, {"chunk_size": 1}):  # checked even where chunk_size decides
            with pytest.raises(ValueError, match=r"max_memory must be None or a positive number of bytes"):
                call(max_memory=bad, **opts)
