"""Issue 27's plain PyTorch network: what a user writes without dagc, the baseline `equal_time.py`
times `dagc train` against on the same cores.

Four 3x3 convolutions (32, 32, 64, 64 channels; the second of stride 2), each with batch norm
and ReLU, shared by one small head per task: a classification head pools the 16x16 features to
4x4 and applies one linear layer (position matters: ``left`` and ``right`` are the digits at two
places of one image); a segmentation head is a 1x1 convolution upsampled bilinearly to the input.
Adam 1e-3, batch 64, the tasks' losses summed (cross-entropy), as the issue describes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dagc.trainer.datasets import MultiTaskData
from dagc.trainer.evaluation import score


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PlainNet(nn.Module):
    """The shared trunk and one head per task of ``data`` (classification and segmentation)."""

    def __init__(self, data: MultiTaskData) -> None:
        super().__init__()
        c = data.in_channels
        self.trunk = nn.Sequential(_conv(c, 32), _conv(32, 32, 2), _conv(32, 64), _conv(64, 64))
        self.size = tuple(data.input_size)
        self.heads = nn.ModuleDict()
        for t in data.tasks:
            if t.kind == "classification":
                self.heads[t.name] = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, t.out_channels))
            elif t.kind == "segmentation":
                self.heads[t.name] = nn.Conv2d(64, t.out_channels, 1)
            else:
                raise ValueError(f"the plain network has no head for task kind {t.kind!r}")
        self.kinds = {t.name: t.kind for t in data.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.trunk(x)
        out = {}
        for name, head in self.heads.items():
            y = head(f)
            if self.kinds[name] == "segmentation":
                y = F.interpolate(y, size=self.size, mode="bilinear", align_corners=False)
            out[name] = y
        return out


def macs(net: PlainNet, data: MultiTaskData) -> int:
    """Multiply-accumulates of one sample, counted as `dagc.costs` counts them (convs and linears)."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            total += out.shape[1] * out.shape[2] * out.shape[3] * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            total += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    net.eval()
    with torch.no_grad():
        net(torch.zeros(1, data.in_channels, *data.input_size))
    for h in handles:
        h.remove()
    return total


def held_out(net: PlainNet, data: MultiTaskData) -> dict[str, dict[str, float]]:
    """Held-out metrics through dagc's one scoring loop, so both models are scored alike."""
    net.eval()

    @torch.no_grad()
    def predict(tasks, x: np.ndarray) -> dict[str, np.ndarray]:
        out = net(torch.from_numpy(x))
        return {t: out[t].numpy() for t in tasks}

    spec_like = _SpecView(data)
    return score(spec_like, data.test, predict)


class _SpecView:
    """What `score` reads of a spec: the task names, each task, and whether the input is shared."""

    def __init__(self, data: MultiTaskData) -> None:
        self.tasks = data.tasks
        self.task_names = tuple(t.name for t in data.tasks)
        self.shared_input = data.shared_input

    def task(self, name: str):
        return next(t for t in self.tasks if t.name == name)


def train_plain(data: MultiTaskData, seconds: float, *, seed: int = 0, batch_size: int = 64, lr: float = 1e-3,
                checkpoints: tuple[float, ...] = (), on_eval: Callable[[dict], None] | None = None) -> tuple[PlainNet, list[dict]]:
    """Train for ``seconds`` of wall time (evaluation excluded); evaluate on the held-out split at
    each of ``checkpoints`` (seconds of training) and at the end. Returns the network and the
    curve: ``{"seconds", "iterations", "epochs", "held_out"}`` per evaluation."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = PlainNet(data)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x_all, y_all = data.train.inputs, data.train.targets
    n = len(x_all)
    marks = sorted(c for c in checkpoints if c < seconds) + [seconds]
    curve: list[dict] = []
    elapsed, it = 0.0, 0
    while marks:
        t0 = time.perf_counter()
        net.train()
        idx = rng.integers(0, n, batch_size)
        x = torch.from_numpy(x_all[idx])
        out = net(x)
        loss = sum(F.cross_entropy(out[t.name], torch.from_numpy(y_all[t.name][idx])) for t in data.tasks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        elapsed += time.perf_counter() - t0
        if elapsed >= marks[0]:
            marks.pop(0)
            entry = {"seconds": round(elapsed, 1), "iterations": it, "epochs": round(it * batch_size / n, 2),
                     "held_out": held_out(net, data)}
            curve.append(entry)
            if on_eval is not None:
                on_eval(entry)
    return net, curve
