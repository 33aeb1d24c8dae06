"""Differentiable maps: train a small CNN with a loss on its own Grad-CAM.

Task: 32x32 grey noise images with one bright 8x8 shape at a random place, a filled square (label 0) or
a hollow one (label 1). Besides cross-entropy, a CAM loss asks the Grad-CAM map of the true class to put
its mass inside the shape's box. funcam's maps are ordinary differentiable tensors (torch.func.vjp
inside, no hooks, no .detach()), so the CAM loss backpropagates into the weights like any other loss
(a double backward). A second run with cross-entropy only shows what the CAM loss adds.

Run: python examples/train_with_cam_loss.py   (CPU, about 30 s)
"""
import time

import torch
import torch.nn.functional as F
from torch import nn

import funcam

SIZE, SQUARE, STEPS, BATCH, LR = 32, 8, 200, 64, 5e-3
# Tensors this small gain nothing from intra-op threads, and several threads slow down sharply (10x and
# more) when other processes busy the CPU cores; one thread keeps the run at about 30 s.
torch.set_num_threads(1)


def make_batch(n: int, generator: torch.Generator):
    """Images (n, 1, 32, 32), labels (n,) (0: filled, 1: hollow), box masks (n, 1, 32, 32) of the shape."""
    x = 0.3 * torch.rand(n, 1, SIZE, SIZE, generator=generator)
    mask = torch.zeros_like(x)
    y = torch.randint(0, 2, (n,), generator=generator)
    rows, cols = torch.randint(0, SIZE - SQUARE + 1, (2, n), generator=generator)
    for i in range(n):
        r, c = int(rows[i]), int(cols[i])
        mask[i, :, r:r + SQUARE, c:c + SQUARE] = 1.0
        x[i, :, r:r + SQUARE, c:c + SQUARE] += 0.7
        if y[i] == 1:  # hollow: keep a 2-pixel border
            x[i, :, r + 2:r + SQUARE - 2, c + 2:c + SQUARE - 2] -= 0.7
    return x, y, mask


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),   # 16x16
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 2)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def cam_mass_inside(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image fraction of the map's mass inside the box, at image resolution (the "energy" pointing
    game of Score-CAM, Wang et al. 2020); maps (B, 1, h, w) >= 0, mask (B, 1, 32, 32)."""
    up = funcam.upsample(maps, mask.shape[-2:])
    return (up * mask).sum(dim=(1, 2, 3)) / (up.sum(dim=(1, 2, 3)) + 1e-8)


def cam_loss_fn(signed_maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-log of the softmax(map) mass inside the box: smooth, and never stuck on an all-zero ReLU map."""
    p = funcam.upsample(signed_maps, mask.shape[-2:]).flatten(1).softmax(dim=1)
    return -torch.log((p * mask.flatten(1)).sum(dim=1) + 1e-8).mean()


test_x, test_y, test_mask = make_batch(512, torch.Generator().manual_seed(1))


def evaluate(model, split):
    """Test accuracy and mean CAM mass inside the box (ReLU'd Grad-CAM of the true class)."""
    model.eval()
    with torch.no_grad():
        acc = (model(test_x).argmax(1) == test_y).float().mean().item()
    maps = funcam.gradcam(split, test_x, test_y.unsqueeze(1)).detach()   # (512, 1, 16, 16)
    return acc, cam_mass_inside(maps, test_mask).mean().item()


def train(cam_weight: float, verbose: bool):
    torch.manual_seed(0)
    model = SmallCNN()
    # An FX cut after the feature stack: extract = the model up to `features`, head = pool + fc. No hooks
    # and no copies: the split calls the model's own modules, so it follows the weights as they train.
    split = funcam.split(model, layer="features")
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    before = evaluate(model, split)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    model.train()
    for step in range(1, STEPS + 1):
        x, y, mask = make_batch(BATCH, g)
        # signed (relu=False) maps of the true class, (B, 1, 16, 16), and the logits, from one forward
        out = funcam.cam(split, x, y.unsqueeze(1), relu=False)
        ce = F.cross_entropy(out.logits, y)
        cam_loss = cam_loss_fn(out.maps, mask)
        loss = ce + cam_weight * cam_loss
        opt.zero_grad()
        loss.backward()                                  # through the maps into the weights
        opt.step()
        if verbose and (step == 1 or step % 20 == 0):
            print(f"step {step:3d}  loss {loss.item():.3f}  "
                  f"(cross-entropy {ce.item():.3f} + {cam_weight:g} x cam {cam_loss.item():.3f})")
    return before, evaluate(model, split), time.perf_counter() - t0


(acc0, inside0), (acc1, inside1), seconds = train(cam_weight=1.0, verbose=True)
_, (acc_ce, inside_ce), _ = train(cam_weight=0.0, verbose=False)
print(f"box area / image area: {SQUARE ** 2 / SIZE ** 2:.2f} (the mass inside a uniform map)")
print(f"before training        : accuracy {acc0:.2f}, CAM mass inside the box {inside0:.2f}")
print(f"after, cross-entropy   : accuracy {acc_ce:.2f}, CAM mass inside the box {inside_ce:.2f}")
print(f"after, + CAM loss      : accuracy {acc1:.2f}, CAM mass inside the box {inside1:.2f}")
print(f"{STEPS} steps with the CAM loss took {seconds:.1f} s")
assert acc1 > 0.9 and inside1 > inside0, "training did not converge"
print("train_with_cam_loss OK")
