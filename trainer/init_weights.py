"""Starting weights (``dagc train --init SOURCE``, `TrainConfig.init`): θ taken from a file instead of
the seed's initialisation, right after the network is built and before warm-up (`state.new_run`).

SOURCE is one safetensors file (or a run directory: its ``checkpoint.safetensors``) of one of two
layouts, told apart by its tensor names:

* a dagc checkpoint or training state (``theta.*``; README "Checkpoint format"): every θ tensor of
  the network whose name the file holds is loaded; the shape must agree, except in a task's head
  (a task of the same name may predict another number of classes), whose mismatched tensors stay
  at their initial value and are reported;
* torchvision's VGG-16 ``state_dict`` (``features.N.weight``) onto a network with the ``vgg16``
  preset's hidden states: the conv weights go onto ``read_in.0`` and the chain edges ``i -> i+1``
  (`VGG16_MAP`; FORMAT.md "Starting weights from VGG-16").

Never loaded: batch-norm running statistics (per task, shape (K, C): they start fresh, also when the
tasks agree, since they describe the source's sub-networks), the architecture logits and masks
(``arch.*``, ``mask.*``: the search decides them), optimizer state. Refused with one line
(`CheckpointError`): a missing file, a pickle (``.pth``, ``.pt``, ...; with the command that converts
it), a file that is not safetensors, one with no tensor this network can take, a shape mismatch
(naming the tensor and both shapes), a NaN or infinite value. Nothing is changed unless everything
checks out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load
from torch import Tensor

from dagc.blocks import BN_BUFFERS
from dagc.checkpoint import FORMAT, load_checkpoint
from dagc.errors import CheckpointError
from dagc.network_file import preset_network
from dagc.trainer.network import CentralNetwork

RUN_CHECKPOINT = "checkpoint.safetensors"  # what a run directory given as SOURCE means
PICKLE_SUFFIXES = (".pth", ".pt", ".pkl", ".pickle", ".ckpt")
# torchvision's VGG-16 `features`: the 13 convs (3x3, with bias), in order; max-pools at 4, 9, 16, 23, 30.
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_NAMES = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
               "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")
# The mapping onto the vgg16 preset's 12 hidden states: conv1_1 reads the image (read-in of state 0),
# the k-th conv after it is the chain edge k-1 -> k. conv5_3 (features.28), the last, is left out:
# the preset has two states at stride 16, and dropping the last conv keeps every mapped conv reading
# the output of the conv it read in VGG-16 (dropping any other would break that for its successor).
VGG16_MAP = {"features.0.weight": "theta.read_in.0.conv.weight",
             **{f"features.{f}.weight": f"theta.edges.{k - 1}_{k}.conv.weight"
                for k, f in enumerate(VGG16_CONVS[1:12], start=1)}}
VGG16_LEFT_OUT = "features.28.weight"
_VGG_KEY = re.compile(r"features\.\d+\.(weight|bias)$")


def resolve_source(source: str | Path) -> Path:
    """The file SOURCE names: itself, or a run directory's `RUN_CHECKPOINT`. Raises CheckpointError
    for a missing file or a pickle."""
    path = Path(source)
    if path.is_dir():
        if not (path / RUN_CHECKPOINT).is_file():
            raise CheckpointError(f"--init {path}: the run directory holds no {RUN_CHECKPOINT} (the run did not "
                                  f"finish); give one of its files, e.g. {path / 'warmup.safetensors'}")
        return path / RUN_CHECKPOINT
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(_pickle_message(path))
    if not path.is_file():
        raise CheckpointError(f"--init {path}: no such file; give a .safetensors file or a dagc run directory")
    return path


def _pickle_message(path: Path) -> str:
    out = path.with_suffix(".safetensors")
    return (f"--init {path}: a PyTorch pickle file; dagc reads no pickle (loading one can run any code): "
            "convert the state_dict once with python -c \"import torch; from safetensors.torch import save_file; "
            f"sd = torch.load('{path}', map_location='cpu', weights_only=True); "
            f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{out}')\" and give --init {out}")


def read_source(source: str | Path) -> tuple[Path, str, dict[str, Tensor]]:
    """(file, layout ``dagc`` or ``vgg16``, its tensors) of SOURCE. Raises CheckpointError."""
    path = resolve_source(source)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"--init {path}: cannot read it ({e.strerror or e})") from None
    try:
        tensors = load(data)
        meta = _metadata(data)
    except (SafetensorError, ValueError, RuntimeError, AttributeError) as e:
        if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":  # torch.save's zip, or a bare pickle
            raise CheckpointError(_pickle_message(path)) from None
        raise CheckpointError(f"--init {path} is truncated or not a safetensors file ({e}); give a .safetensors "
                              "file or a dagc run directory") from None
    if meta.get("format") == FORMAT:  # a dagc checkpoint: its own checks (format, version, finite values)
        return path, "dagc", load_checkpoint(path, migrate=True).tensors
    if any(k.startswith("theta.") for k in tensors):
        return path, "dagc", tensors
    if "features.0.weight" in tensors and all(_VGG_KEY.match(k) or k.startswith("classifier.") for k in tensors):
        return path, "vgg16", tensors
    raise CheckpointError(f"--init {path}: no tensor in it matches this network (neither a dagc checkpoint's "
                          "theta.* names nor torchvision VGG-16's features.N.weight; e.g. "
                          f"{sorted(tensors)[:3]}); give a dagc run or checkpoint, or a VGG-16 state_dict")


def _metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def initial_tensors(net: CentralNetwork) -> dict[str, Tensor]:
    """θ as --init can set it, by checkpoint name (``theta.*``): every parameter except the
    architecture logits; no buffer (the batch-norm running statistics start fresh)."""
    return {f"theta.{k}": p for k, p in net.named_parameters() if not k.startswith("arch_")}


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _plan_dagc(path: Path, src: dict[str, Tensor], want: dict[str, Tensor]) -> tuple[dict, list, list]:
    """(target -> tensor, unused source names, heads' tensors left for their shape) of a dagc file."""
    plan, unused, kept = {}, [], []
    for name, t in sorted(src.items()):
        if not name.startswith("theta.") or name.rsplit(".", 1)[-1] in BN_BUFFERS:
            continue  # never loaded: arch.*, mask.*, optim.*, rewind.*, batch-norm running statistics
        if name not in want:
            unused.append(name)
        elif _shape(t) == _shape(want[name]):
            plan[name] = t
        elif name.startswith("theta.heads."):  # the same task may have another number of classes
            kept.append(f"{name} {_shape(t)} vs {_shape(want[name])}")
        else:
            raise CheckpointError(f"--init {path}: tensor {name} has shape {_shape(t)}, this run's network needs "
                                  f"{_shape(want[name])}; give a run of the same network (preset, flow constant "
                                  "and input channels) or drop --init")
    return plan, unused, kept


def _plan_vgg16(path: Path, src: dict[str, Tensor], want: dict[str, Tensor], net: CentralNetwork) -> tuple[dict, list]:
    """(target -> tensor, unused source names) of a torchvision VGG-16 file (`VGG16_MAP`)."""
    states = preset_network("vgg16").states
    if tuple(net.spec.states) != tuple(states):
        have = [(s.channels, s.stride) for s in net.spec.states]
        raise CheckpointError(f"--init {path} is a VGG-16 state_dict, which initialises the vgg16 preset's 12 "
                              f"hidden states (channels, stride) {[(s.channels, s.stride) for s in states]}; this "
                              f"run's network has {have}: train with --preset vgg16 or drop --init")
    missing = [k for k in VGG16_MAP if k not in src]
    if missing:
        raise CheckpointError(f"--init {path}: a VGG-16 state_dict needs {missing[0]} (and {len(missing) - 1} more "
                              "missing); give torchvision's vgg16 (not vgg16_bn) features")
    plan = {}
    for s, d in VGG16_MAP.items():
        if _shape(src[s]) != _shape(want[d]):
            raise CheckpointError(f"--init {path}: tensor {s} has shape {_shape(src[s])}; it maps onto {d}, which "
                                  f"needs {_shape(want[d])}; give torchvision's VGG-16 weights (3-channel input)")
        plan[d] = src[s]
    return plan, sorted(k for k in src if k not in VGG16_MAP)


def apply_init(net: CentralNetwork, source: str | Path) -> dict[str, Any]:
    """Load SOURCE's tensors into ``net``'s θ (module doc) and return the load report: ``source``,
    ``layout``, ``loaded`` and ``left`` (θ names set from the file and left at their initial value),
    ``unused`` (the file's tensors not taken), ``heads_kept`` (head tensors of another shape, left
    at their initial value) and ``batch_norm_statistics`` (always ``fresh``). Raises CheckpointError;
    ``net`` is unchanged then."""
    path, layout, src = read_source(source)
    want = initial_tensors(net)
    if layout == "dagc":
        plan, unused, kept = _plan_dagc(path, src, want)
    else:
        (plan, unused), kept = _plan_vgg16(path, src, want, net), []
    if not plan:
        raise CheckpointError(f"--init {path}: no tensor in it matches this network by name and shape; give a run "
                              "of the same network or drop --init")
    for name, t in sorted(plan.items()):
        if not t.is_floating_point():
            raise CheckpointError(f"--init {path}: tensor {name} is {str(t.dtype).removeprefix('torch.')}, "
                                  "a floating-point tensor is needed")
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"--init {path}: tensor {name} has {int((~torch.isfinite(t)).sum())} NaN or "
                                  "infinite value(s); the weights are unusable, give another file")
    with torch.no_grad():
        for name, t in plan.items():
            want[name].copy_(t.to(want[name].dtype))
    inverse = {v: k for k, v in VGG16_MAP.items()}
    return {"source": str(path), "layout": layout, "loaded": sorted(plan),
            "left": sorted(k for k in want if k not in plan),
            "unused": unused, "heads_kept": kept, "batch_norm_statistics": "fresh",
            **({"from": {d: inverse[d] for d in sorted(plan)}} if layout == "vgg16" else {})}


def report_lines(report: dict[str, Any]) -> list[str]:
    """The load report as a few lines for people: counts, then the names, compacted."""
    lines = [f"init: loaded {len(report['loaded'])} tensors from {report['source']} ({report['layout']}): "
             f"{compact(report['loaded'])}",
             f"init: left {len(report['left'])} at their initial value: {compact(report['left'])}"]
    if report.get("heads_kept"):
        lines.append(f"init: head tensors of another shape, left at their initial value: {'; '.join(report['heads_kept'])}")
    if report.get("unused"):
        lines.append(f"init: not used from the file ({len(report['unused'])}): {compact(report['unused'])}")
    lines.append("init: batch-norm running statistics start fresh (per task, never transferred); "
                 "arch.* and mask.* are not loaded (the search decides them)")
    return lines


def compact(names: Iterable[str], limit: int = 10) -> str:
    """Names grouped by block, e.g. ``edges.{0_1,1_2}.{bn.bias,bn.weight,conv.weight}`` or
    ``heads.{depth,seg}.* (26 tensors each)``; at most ``limit`` groups shown."""
    tails: dict[tuple[str, str], list[str]] = {}
    single: list[str] = []
    for name in names:
        parts = name.removeprefix("theta.").split(".")
        if len(parts) >= 3 and parts[0] in ("edges", "read_in", "read_out", "heads", "features"):
            tails.setdefault((parts[0], parts[1]), []).append(".".join(parts[2:]))
        else:
            single.append(name.removeprefix("theta."))
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for (family, idx), ts in tails.items():
        groups.setdefault((family, tuple(sorted(ts))), []).append(idx)
    out = []
    for (family, ts), ids in groups.items():
        ids = sorted(ids, key=lambda i: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", i)])
        inner = ids[0] if len(ids) == 1 else "{" + ",".join(ids) + "}"
        if len(ts) == 1:
            out.append(f"{family}.{inner}.{ts[0]}")
        elif len(ts) <= 3:
            out.append(f"{family}.{inner}.{{{','.join(ts)}}}")
        else:
            out.append(f"{family}.{inner}.* ({len(ts)} tensors{' each' if len(ids) > 1 else ''})")
    out += single
    more = f" and {len(out) - limit} more" if len(out) > limit else ""
    return ("; ".join(out[:limit]) + more) if out else "none"


__all__ = ["apply_init", "read_source", "resolve_source", "initial_tensors", "report_lines", "compact",
           "VGG16_MAP", "VGG16_CONVS", "VGG16_NAMES", "VGG16_LEFT_OUT"]
