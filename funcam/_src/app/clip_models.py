"""CLIP models for text prompts: an open_clip architecture with a local state dict, or a Hugging Face CLIP folder;
their preprocessing, and their own text towers to embed the prompts. Nothing is downloaded.

* ``open_clip:ARCH``: one of open_clip's architecture names (``RN50``, ``ViT-B-32``, ...) or the path of a model
  config JSON in open_clip's format (``{"embed_dim", "vision_cfg", "text_cfg"}``, or an ``open_clip_config.json``
  with its ``"model_cfg"``), built with random weights and then given the checkpoint's state dict. The prompts go
  through open_clip's bundled BPE tokenizer (``bpe_simple_vocab_16e6.txt.gz``, in its wheel); an architecture whose
  tokenizer lives on the Hugging Face Hub (``hf_tokenizer_name``, SigLIP) is refused by name.
* ``hf:FOLDER``: a ``transformers.CLIPModel`` saved with ``save_pretrained`` (``config.json``, the weights) with
  its tokenizer beside it (``tokenizer.json``, or ``vocab.json`` and ``merges.txt``), loaded with
  ``local_files_only=True``; ``preprocessor_config.json`` gives the input size and normalisation when present.

>>> clip = load_clip("open_clip:RN50", checkpoint="rn50.pt")          # doctest: +SKIP
>>> text, scale = clip.encode(["a cat", "a dog"])                       # (2, 1024), logit_scale.exp()
"""
from __future__ import annotations

import difflib
import json
import os
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from funcam._src.app.hub import ModelError, load_strict, seeded
from funcam._src.app.hub import why as _why
from funcam._src.app.models import Preprocess

__all__ = ["Clip", "check_clip", "load_clip"]

# Radford et al. 2021's normalisation (open_clip's OPENAI_DATASET_MEAN / STD, the CLIPImageProcessor default)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HF_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


class Clip(NamedTuple):
    """A loaded CLIP model: ``model`` (eval mode), its image ``pre``processing, and ``encode(prompts) ->
    (text embeddings (K, D), logit scale (a one-element tensor, ``logit_scale.exp()``))`` by its own text tower."""
    model: nn.Module
    pre: Preprocess
    encode: Callable[[Sequence[str]], tuple[Tensor, Tensor]]


def _prefix(name: str) -> tuple[str, str]:
    family, _, rest = name.partition(":")
    if family not in ("open_clip", "hf") or not rest:
        raise ModelError(f"a CLIP model is open_clip:ARCH or hf:FOLDER, got {name!r}")
    return family, rest


def _open_clip_config(arch: str) -> dict:
    """The model config of ``arch``: an open_clip architecture name or a JSON file; ModelError naming the nearest."""
    import open_clip

    if arch.endswith(".json") or os.sep in arch:
        try:
            with open(arch, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise ModelError(f"open_clip model config {arch!r} cannot be read: {_why(e)}") from None
        cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else cfg
        if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
            raise ModelError(f"open_clip model config {arch!r} must hold embed_dim, vision_cfg and text_cfg")
        return cfg
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        near = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        raise ModelError(f"unknown open_clip architecture {arch!r}" + (
            f"; did you mean {', '.join(map(repr, near))}?" if near else "; see open_clip.list_models()"))
    return cfg


def _check_open_clip_tokenizer(arch: str, cfg: dict) -> int:
    """The context length of the bundled tokenizer for ``cfg``; ModelError when the text tower needs another."""
    text = cfg.get("text_cfg", {})
    hub = text.get("hf_tokenizer_name") or ("SigLIP's" if "siglip" in os.path.basename(arch).lower() else "")
    if hub:
        raise ModelError(f"open_clip:{arch} tokenizes with the Hugging Face tokenizer {hub!r}, which is not bundled "
                         f"with open_clip and funcam downloads nothing; save the model as a Hugging Face CLIP folder "
                         f"(hf:FOLDER) with its tokenizer files")
    vocab = int(text.get("vocab_size", 49408))
    if vocab < 49408:
        raise ModelError(f"open_clip:{arch}: the text tower has vocab_size {vocab}, smaller than open_clip's bundled "
                         f"tokenizer's 49408 tokens")
    return int(text.get("context_length", 77))


def _hf_missing(folder: str) -> str | None:
    """What ``folder`` lacks to be a Hugging Face CLIP folder with its tokenizer (None: nothing)."""
    if not os.path.isdir(folder):
        return "it is not a folder"
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return "config.json is missing"
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
               "pytorch_model.bin.index.json")
    if not any(os.path.isfile(os.path.join(folder, w)) for w in weights):
        return f"no weights ({' or '.join(weights[:2])})"
    if not any(all(os.path.isfile(os.path.join(folder, f)) for f in files) for files in HF_TOKENIZER_FILES):
        missing = [f for f in HF_TOKENIZER_FILES[1] if not os.path.isfile(os.path.join(folder, f))]
        return f"no tokenizer: tokenizer.json, or vocab.json and merges.txt, is needed ({', '.join(missing)} missing)"
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            kind = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        return f"config.json cannot be read ({_why(e)})"
    return None if kind == "clip" else f"config.json describes a {kind!r} model, not a CLIP model ('clip')"


def check_clip(name: str, *, checkpoint: bool, random_weights: bool) -> None:
    """Check ``name`` and its source of weights before anything is built (module docstring); ModelError says why."""
    family, rest = _prefix(name)
    if family == "hf":
        why = _hf_missing(rest)
        if why:
            raise ModelError(f"hf:{rest}: {why}")
        if checkpoint or random_weights:
            raise ModelError(f"hf:{rest} loads the weights saved in the folder; --checkpoint and --random-weights "
                             f"apply to open_clip: and torchvision: models")
        return
    _check_open_clip_tokenizer(rest, _open_clip_config(rest))
    if not (checkpoint or random_weights):
        raise ModelError(f"open_clip:{rest} needs weights: --checkpoint FILE (an open_clip state dict), or "
                         f"--random-weights (an untrained network: its maps mean nothing)")


def load_clip(name: str, *, checkpoint: dict | None = None, random_weights: bool = False) -> Clip:
    """Build the CLIP model ``name`` (``open_clip:ARCH`` or ``hf:FOLDER``) in eval mode with its weights: a state
    dict (already read and checked) for open_clip, the folder's own for Hugging Face."""
    check_clip(name, checkpoint=checkpoint is not None, random_weights=random_weights)
    family, rest = _prefix(name)
    return _load_hf(rest) if family == "hf" else _load_open_clip(rest, checkpoint)


def _load_open_clip(arch: str, state: dict | None) -> Clip:
    import open_clip

    cfg = _open_clip_config(arch)
    context = _check_open_clip_tokenizer(arch, cfg)
    custom = "hf_model_name" in cfg["text_cfg"] or cfg.get("custom_text", False)
    kwargs = {k: v for k, v in cfg.items() if k != "custom_text"}
    try:
        with seeded():  # random weights: the same network on every run
            model = (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**kwargs)
    except Exception as e:  # noqa: BLE001 - a config with wrong fields fails in many ways
        raise ModelError(f"could not build open_clip:{arch}: {_why(e)}") from e
    if state is not None:
        load_strict(model, state, f"checkpoint does not fit open_clip:{arch}")
    model = model.eval()
    vision = cfg["vision_cfg"]
    size = vision.get("image_size", 224)
    pre = Preprocess(size=int(size if isinstance(size, int) else size[-1]), crop_pct=1.0,
                     mean=tuple(vision.get("image_mean", CLIP_MEAN)), std=tuple(vision.get("image_std", CLIP_STD)),
                     interpolation="bicubic")
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context)

    def encode(prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        p = next(model.parameters())
        with torch.no_grad():
            return model.encode_text(tokenizer(list(prompts)).to(p.device)), model.logit_scale.exp()

    return Clip(model, pre, encode)


def _load_hf(folder: str) -> Clip:
    import transformers

    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights: 100%" on stderr, for a local folder
    try:
        model = transformers.CLIPModel.from_pretrained(folder, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ModelError(f"hf:{folder} could not be loaded: {_why(e)}") from e
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    model = model.eval()
    proc = {}
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                proc = json.load(f)
        except (OSError, ValueError) as e:
            raise ModelError(f"hf:{folder}: preprocessor_config.json cannot be read ({_why(e)})") from None
    size = int(model.config.vision_config.image_size)
    pre = Preprocess(size=size, crop_pct=1.0, mean=tuple(proc.get("image_mean", CLIP_MEAN)),
                     std=tuple(proc.get("image_std", CLIP_STD)),
                     interpolation="bicubic" if proc.get("resample", 3) == 3 else "bilinear")

    def encode(prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        p = next(model.parameters())
        tokens = tokenizer(list(prompts), padding=True, return_tensors="pt").to(p.device)
        with torch.no_grad():
            out = model.get_text_features(**tokens)
        return getattr(out, "pooler_output", out), model.logit_scale.exp()

    return Clip(model, pre, encode)
