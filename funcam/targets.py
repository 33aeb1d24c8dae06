"""Score callables for ``classes=``: CLIP prompts, detection boxes and segmentation regions as the K axis.

Public names only; the implementation is in ``funcam._src.core.targets``.

>>> import torch, funcam
>>> score = funcam.targets.prompts(torch.randn(3, 8), logit_scale=100.0)   # K = 3 prompts, D = 8
>>> score(torch.randn(2, 8)).shape                                          # (B, K) from (B, D) image embeddings
torch.Size([2, 3])
"""
from funcam._src.core.targets import UnmatchedBoxWarning, box_matches, boxes, prompts, region

__all__ = ["UnmatchedBoxWarning", "box_matches", "boxes", "prompts", "region"]
