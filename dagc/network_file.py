"""The central network without its tasks, as validated data: `Network`, read from a network file
(FORMAT.md, "Network files") and shipped for the built-in presets (``dagc/networks/<name>.json``).

A network names the hidden states (channels, stride), the read-out state, the flow constant M and
the heads' options; a `dagc.spec.Spec` adds the tasks and the input. The rules both share (the
``check_*`` functions) are defined here once: `Spec.validate` calls them with the prefix
``spec.``, a network file's reader with the file's name, so a message names the file and the field.
"""

from __future__ import annotations

import functools
import json
import numbers
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from dagc.errors import ConfigError, SpecError

# The presets, each shipped as a network file in the package (dagc/networks/<name>.json).
PRESETS = ("tiny", "tiny-v2", "omniglot", "vgg16")
REQUIRED = ("states", "readout", "flow_constant")
OPTIONAL = ("head_channels", "aspp_rates", "head_dropout", "refine_channels", "downsample", "input_size", "name", "description")
# The heads' options a file may leave out: the same defaults as `dagc.spec.Spec`'s.
HEAD_DEFAULTS = {"head_channels": 64, "aspp_rates": (1, 2, 3, 4), "head_dropout": 0.0, "refine_channels": 0}
DEFAULT_NAME = "custom"
# Where a hidden edge that raises the stride downsamples (`dagc.blocks`): "max_pool_after", the
# paper's Table 8 (conv at the source resolution, then max-pool), or "average_before" (average-pool
# to the destination stride, then the conv: the conv runs on (stride ratio)^2 fewer pixels). The
# second departs from the paper, opt-in: on multidigits (seed 0) it made the search step 2.4x
# cheaper and cut the deployed FLOPs from 74.4 to 32.0 MFLOPs at equal held-out metrics; on synthetic it lost 7 points of
# edge F (high-resolution detail), so `tiny` keeps the paper's (benchmarks/RESULTS.md, issue 27).
DOWNSAMPLES = ("max_pool_after", "average_before")
# vgg16's file is under 2 KB; a megabyte is no network anyone writes by hand or by script.
MAX_FILE_BYTES = 1 << 20

__all__ = ["PRESETS", "DOWNSAMPLES", "Network", "StateSpec", "check_states", "check_heads", "check_downsample", "check_input_size",
           "preset_network", "preset_path"]


@dataclass(frozen=True)
class StateSpec:
    """One hidden (or the read-out) state: its channels and its stride relative to the input."""

    channels: int
    stride: int


def _positive_int(v: Any) -> bool:
    # bool is an int subclass; True is not a channel count.
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def check_downsample(downsample: Any, prefix: str) -> None:
    """Raise SpecError unless ``downsample`` is one of `DOWNSAMPLES`."""
    if downsample not in DOWNSAMPLES:
        raise SpecError(f"{prefix}downsample must be one of {list(DOWNSAMPLES)}, got {downsample!r}")


def check_states(states: Any, readout: Any, flow_constant: Any, prefix: str) -> None:
    """Check the hidden states, the read-out and M: at least one state, positive channels and
    strides, strides that grow by integer factors, M >= 1. Raises SpecError naming the first bad
    field after ``prefix`` (e.g. ``spec.states[2].stride ...``)."""
    if not states:
        raise SpecError(f"{prefix}states: a central network needs at least one hidden state")
    for idx, s in enumerate((*states, readout)):
        where = f"{prefix}states[{idx}]" if idx < len(states) else f"{prefix}readout"
        if not _positive_int(s.channels):
            raise SpecError(f"{where}.channels must be a positive integer, got {s.channels!r}")
        if not _positive_int(s.stride):
            raise SpecError(f"{where}.stride must be a positive integer, got {s.stride!r}")
    for idx in range(1, len(states)):
        lo, hi = states[idx - 1].stride, states[idx].stride
        if hi < lo or hi % lo:
            raise SpecError(
                f"{prefix}states[{idx}].stride must be a multiple of the previous state's "
                f"stride {lo} (strides only grow, by integer factors), got {hi}"
            )
    if not _positive_int(flow_constant):
        raise SpecError(f"{prefix}flow_constant (M) must be an integer >= 1, got {flow_constant!r}")


def check_input_size(input_size: Any, strides: tuple[int, ...], prefix: str) -> None:
    """Check an input size (H, W): two positive integers, each divisible by every stride.
    Raises SpecError naming ``{prefix}input_size``."""
    if (not isinstance(input_size, (tuple, list)) or len(input_size) != 2
            or not all(_positive_int(v) for v in input_size)):
        raise SpecError(f"{prefix}input_size must be two positive integers (H, W), got {input_size!r}")
    for s in strides:
        if any(v % s for v in input_size):
            raise SpecError(
                f"{prefix}input_size {tuple(input_size)} must be divisible by every stride "
                f"(found stride {s}); choose a multiple of {max(strides)}"
            )


def check_heads(head_channels: Any, aspp_rates: Any, head_dropout: Any, prefix: str, refine_channels: Any = 0) -> None:
    """Check the heads' options: positive width, positive dilation rates, dropout in [0, 1), a
    refinement width >= 0. Raises SpecError naming the first bad field after ``prefix``."""
    if not _positive_int(head_channels):
        raise SpecError(f"{prefix}head_channels must be a positive integer, got {head_channels!r}")
    if (not isinstance(aspp_rates, (tuple, list)) or not aspp_rates
            or not all(_positive_int(r) for r in aspp_rates)):
        raise SpecError(f"{prefix}aspp_rates must be positive integers, got {aspp_rates!r}")
    if (isinstance(head_dropout, bool) or not isinstance(head_dropout, numbers.Real)
            or not 0.0 <= float(head_dropout) < 1.0):
        raise SpecError(f"{prefix}head_dropout must be a number in [0, 1), got {head_dropout!r}")
    if not (refine_channels == 0 and not isinstance(refine_channels, bool) or _positive_int(refine_channels)):
        raise SpecError(f"{prefix}refine_channels must be an integer >= 0 (0: no refinement), got {refine_channels!r}")


@dataclass(frozen=True)
class Network:
    """A central network without its tasks (paper Sec. 3.1, appendix A).

    Fields:
        states: the N hidden states, topologically sorted; strides grow by integer factors.
        readout: the read-out state v_L.
        flow_constant: M in 1..N-1 (hidden edges i -> j for 0 < j - i <= M; N - 1 is the complete DAG).
        head_channels, aspp_rates, head_dropout: the ASPP heads' width, dilation rates, dropout.
        refine_channels: width of the dense heads' refinement at the input's resolution (0: none).
        downsample: where a stride-raising hidden edge downsamples (`DOWNSAMPLES`).
        input_size: (H, W) that `dagc inspect --network` counts FLOPs at by default, or None;
            a run trains at its data's size.
        name: informational (a spec's ``preset``): the preset's name, or ``custom``.
        description: informational free text (where the network comes from).
        source: the file the network was read from, for messages; not compared, not stored.

    Raises SpecError naming the first invalid field.
    """

    states: tuple[StateSpec, ...]
    readout: StateSpec
    flow_constant: int
    head_channels: int = HEAD_DEFAULTS["head_channels"]
    aspp_rates: tuple[int, ...] = HEAD_DEFAULTS["aspp_rates"]
    head_dropout: float = HEAD_DEFAULTS["head_dropout"]
    refine_channels: int = HEAD_DEFAULTS["refine_channels"]
    downsample: str = DOWNSAMPLES[0]
    input_size: tuple[int, int] | None = None
    name: str = DEFAULT_NAME
    description: str = ""
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "network.") -> None:
        """Raise SpecError naming the first invalid field after ``prefix``."""
        _check_network(self, prefix)

    @property
    def n_states(self) -> int:
        return len(self.states)

    def strides(self) -> tuple[int, ...]:
        """The strides of the hidden states and of the read-out, in order."""
        return tuple(s.stride for s in (*self.states, self.readout))

    def to_dict(self) -> dict[str, Any]:
        """The network as the JSON data of a network file (input_size only when set)."""
        d: dict[str, Any] = {
            "name": self.name,
            "states": [{"channels": s.channels, "stride": s.stride} for s in self.states],
            "readout": {"channels": self.readout.channels, "stride": self.readout.stride},
            "flow_constant": self.flow_constant, "head_channels": self.head_channels,
            "aspp_rates": list(self.aspp_rates), "head_dropout": self.head_dropout,
        }
        if self.refine_channels:
            d["refine_channels"] = self.refine_channels
        if self.downsample != DOWNSAMPLES[0]:
            d["downsample"] = self.downsample
        if self.input_size is not None:
            d["input_size"] = list(self.input_size)
        if self.description:
            d["description"] = self.description
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = "network") -> Network:
        """Takes a network file's JSON data and the name of where it came from (for messages);
        returns the network. Raises SpecError ``<source>: <field> ...`` for an unknown or missing
        field, a value of the wrong type or one that breaks a rule."""
        prefix = f"{source}: "
        if not isinstance(d, dict):
            raise SpecError(f"{prefix}a network file holds one JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(REQUIRED) - set(OPTIONAL))
        if unknown:
            raise SpecError(f"{prefix}unknown field(s) {unknown}; a network has {[*REQUIRED, *OPTIONAL]}")
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise SpecError(f"{prefix}missing field {missing[0]!r}")
        states = d["states"]
        if not isinstance(states, list):
            raise SpecError(f"{prefix}states must be a list of {{\"channels\": C, \"stride\": S}}, got {states!r}")
        kw = {**HEAD_DEFAULTS, **d}  # an absent option takes its default; null is a wrong type like any other
        kw["states"] = tuple(_state(s, f"{prefix}states[{i}]") for i, s in enumerate(states))
        kw["readout"] = _state(d["readout"], f"{prefix}readout")
        for key in ("aspp_rates", "input_size"):  # lists in JSON, tuples in the dataclass
            if key in d:
                if not isinstance(kw[key], list):
                    raise SpecError(f"{prefix}{key} must be a list of positive integers, got {kw[key]!r}")
                kw[key] = tuple(kw[key])
        # Check with the file's name in the messages before the dataclass checks again as "network.".
        _check_network(_Fields(kw), prefix)
        kw["head_dropout"] = float(kw["head_dropout"])  # 0 and 0.0 are one network: one spelling in a spec's JSON
        return cls(**kw, source=source)

    @classmethod
    def read(cls, given: Any, *, stored: str) -> Network:
        """A configuration's ``network`` field as a `Network`: the network file at a path, or a
        network's JSON data (a stored configuration's, named ``stored`` in messages). Raises
        ConfigError naming the file (or the configuration) and the field."""
        try:
            if isinstance(given, dict):
                return cls.from_dict(given, source=stored)
            if isinstance(given, (str, os.PathLike)):
                return cls.load(given)
        except SpecError as e:
            raise ConfigError(str(e)) from None
        raise ConfigError(f"network must be the path of a network file, got {given!r}")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Network:
        """Read and validate the network file at ``path``. Raises SpecError naming the file (and
        the field) when it cannot be read, is not JSON or is not a valid network."""
        name = os.fspath(path)
        try:
            # A regular file of bounded size: a FIFO or a device would block or never end.
            if not os.path.isfile(name):
                raise SpecError(f"{name}: not a network file (no such file, or not a regular file)")
            if os.path.getsize(name) > MAX_FILE_BYTES:
                raise SpecError(f"{name}: {os.path.getsize(name):,} bytes is too large for a network file "
                                f"(at most {MAX_FILE_BYTES:,}); give the JSON file FORMAT.md describes")
            with open(name, encoding="utf-8") as f:
                text = f.read(MAX_FILE_BYTES + 1)
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"{name}: cannot read the network file ({getattr(e, 'strerror', None) or e})") from None
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: absurdly nested arrays
            raise SpecError(f"{name}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=name)


class _Fields:
    """Keyword arguments seen as attributes, so that `_check_network` reads them as a `Network`."""

    def __init__(self, kw: dict[str, Any]) -> None:
        self.__dict__.update({"input_size": None, "name": DEFAULT_NAME, "description": "", "downsample": DOWNSAMPLES[0],
                              "refine_channels": 0, **kw})


def _state(value: Any, where: str) -> StateSpec:
    """A state entry of a network file: exactly ``channels`` and ``stride`` (their values are
    checked by `check_states`). Raises SpecError naming ``where``."""
    if not isinstance(value, dict) or set(value) != {"channels", "stride"}:
        raise SpecError(f"{where} must be an object {{\"channels\": C, \"stride\": S}}, got {value!r}")
    return StateSpec(value["channels"], value["stride"])


def _check_network(net: Any, prefix: str) -> None:
    """The rules of a `Network` (read from ``net``'s attributes): `check_states`, M <= N - 1,
    the input size if given, `check_heads`, the name. Raises SpecError after ``prefix``."""
    check_states(net.states, net.readout, net.flow_constant, prefix)
    # Paper Sec. 3.1: M = N - 1 is already the complete DAG; a larger M would be the same network
    # recorded as another (and would count edges that do not exist in a squeeze budget).
    top = max(1, len(net.states) - 1)
    if net.flow_constant > top:
        raise SpecError(f"{prefix}flow_constant (M) must be at most {top} for N = {len(net.states)} hidden states "
                        f"(M = N - 1 is the complete DAG), got {net.flow_constant}")
    if net.input_size is not None:
        check_input_size(net.input_size, tuple(s.stride for s in (*net.states, net.readout)), prefix)
    check_heads(net.head_channels, net.aspp_rates, net.head_dropout, prefix, net.refine_channels)
    check_downsample(net.downsample, prefix)
    if not isinstance(net.name, str) or not net.name or not net.name.replace("_", "").replace("-", "").isalnum():
        raise SpecError(f"{prefix}name must be letters, digits, '_' or '-', got {net.name!r}")
    if not isinstance(net.description, str):
        raise SpecError(f"{prefix}description must be a string, got {net.description!r}")


def preset_path(name: str):
    """The shipped network file of preset ``name`` (a `importlib.resources` traversable).
    Raises SpecError for an unknown preset."""
    if name not in PRESETS:
        raise SpecError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
    return resources.files("dagc").joinpath("networks", f"{name}.json")


@functools.cache
def preset_network(name: str) -> Network:
    """The network of preset ``name`` (`PRESETS`), read once from its shipped file. Raises
    SpecError for an unknown preset (or a damaged installation)."""
    file = preset_path(name)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SpecError(f"preset {name!r}: its network file {file} is unreadable ({e}); reinstall dagc") from None
    return Network.from_dict(data, source=f"preset {name!r} ({file})")
