"""timm's pretrained weights, failing fast offline instead of waiting out huggingface_hub's retries.

``create_pretrained(arch, kwargs)`` is ``timm.create_model(arch, pretrained=True, **kwargs)``, except when the
host of the weights (``huggingface.co``, or the URL's host for older timm entries) does not answer within
``HUB_TIMEOUT`` seconds, or ``HF_HUB_OFFLINE`` is set: then only the local caches are read, and a
``ModelError`` says within seconds that the weights are neither cached nor reachable. (huggingface_hub retries
each of two files five times with back-off; what that costs offline is in benchmarks/README.md.)
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.parse

import torch
from torch import nn


class ModelError(ValueError):
    """A model that cannot be built or loaded; the message says why and what to do."""


def why(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def seeded():
    """The global generator seeded 0 inside, the caller's state restored after: a network built inside has the same
    random weights on every run (random-weight runs resume and compare), and the user's random stream is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def load_strict(model: nn.Module, state: dict, what: str) -> None:
    """``model.load_state_dict(state, strict=True)``; a mismatch raises ModelError naming ``what`` (e.g. "checkpoint
    does not fit 'resnet50'") with torch's first two lines (the missing and unexpected keys)."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise ModelError(f"{what}: {lines[0]} {lines[1].strip() if len(lines) > 1 else ''}".rstrip()) from e


HUB_TIMEOUT = 3.0  # seconds to wait for the weights' host before treating the machine as offline


def create_pretrained(arch: str, kwargs: dict) -> nn.Module:
    """``timm.create_model(arch, pretrained=True)``, failing within seconds when the weights' host cannot be
    reached: then only the local cache is tried (huggingface_hub would retry each file with back-off)."""
    import timm

    cfg = timm.get_pretrained_cfg(arch, allow_unregistered=True)
    hub_id, url = getattr(cfg, "hf_hub_id", None), getattr(cfg, "url", None)
    host = "huggingface.co" if hub_id else urllib.parse.urlparse(url).hostname if url else None
    if host is None:
        raise ModelError(f"timm has no pretrained weights for {arch!r}; use a checkpoint")
    offline = offline_reason(host)
    if offline is None:
        return timm.create_model(arch, pretrained=True, **kwargs)
    try:
        with hub_offline():
            return timm.create_model(arch, pretrained=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - not in the cache (huggingface_hub / torch.hub raise various types)
        raise ModelError(f"the pretrained weights of {arch!r} are not in the local cache and {host} cannot be "
                         f"reached ({offline}); download them once while online, or pass a local checkpoint") from e


def offline_reason(host: str) -> str | None:
    """None when ``host`` answers on port 443 within ``HUB_TIMEOUT`` s; else why not. ``HF_HUB_OFFLINE=1``
    counts as offline without asking. The name lookup runs in a thread, since it has no timeout of its own."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    result: list = []

    def connect() -> None:
        try:
            socket.create_connection((host, 443), timeout=HUB_TIMEOUT).close()
            result.append(None)
        except OSError as e:
            result.append(why(e))

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(HUB_TIMEOUT + 0.5)
    return result[0] if result else f"no answer within {HUB_TIMEOUT:g} s"


@contextlib.contextmanager
def hub_offline():
    """huggingface_hub's offline mode for the duration (cached files only, no request). Its flag is read from
    the environment once, at import, so the module's copy is switched; torch.hub downloads (timm models with a
    plain URL) read their cache first and need no switch."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old
