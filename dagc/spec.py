"""The network spec: the one description of a central network that trainer, compiler and runtime share.

A spec names the hidden states (channels, stride), the read-out state, the flow constant M, the
tasks and their heads, and the input. Indices of hidden states are 0-based everywhere in code and
in stored arrays: hidden state ``i`` is the paper's ``v_{i+1}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from dagc.errors import SpecError
from dagc.network_file import (
    DOWNSAMPLES,
    PRESETS,
    Network,
    StateSpec,
    check_downsample,
    check_heads,
    check_input_size,
    check_states,
    preset_network,
)

HEADS = ("aspp", "linear")


@dataclass(frozen=True)
class TaskKind:
    """The structural facts of a task kind, which trainer, compiler and runtime share (how a kind
    is trained and scored is the trainer's: `dagc.trainer.kinds`).

    Fields:
        name: the kind's name in a spec (``TaskSpec.kind``).
        dense: predicted per pixel (else one prediction per image).
        labelled: predicts one of ``TaskSpec.classes`` labels (so a task of this kind has classes).
        channels: output channels of an unlabelled kind (a labelled one outputs its classes); None
            for an unlabelled kind whose tasks choose their own output size in ``TaskSpec.classes``
            (``regression``: the length of the vector predicted per image).
        head: the head a task of this kind uses (`HEADS`): ``"aspp"`` for a dense kind,
            ``"linear"`` for an image-level one (the compiler emits these two).

    A plug-in adds a kind with `register_kind` (the trainer's `dagc.trainer.kinds.register_kind`
    adds how it trains and scores too).
    """

    name: str
    dense: bool
    labelled: bool
    channels: int | None
    head: str


# Every task kind, registered once: the built-in ones, then any a plug-in registers (`register_kind`).
# Classification and regression are the image-level kinds.
BUILTIN_KINDS: dict[str, TaskKind] = {k.name: k for k in (
    TaskKind("segmentation", dense=True, labelled=True, channels=None, head="aspp"),
    TaskKind("classification", dense=False, labelled=True, channels=None, head="linear"),
    TaskKind("depth", dense=True, labelled=False, channels=1, head="aspp"),
    TaskKind("normal", dense=True, labelled=False, channels=3, head="aspp"),
    TaskKind("edge", dense=True, labelled=False, channels=1, head="aspp"),
    TaskKind("saliency", dense=True, labelled=False, channels=1, head="aspp"),
    TaskKind("regression", dense=False, labelled=False, channels=None, head="linear"),
)}
KINDS: dict[str, TaskKind] = dict(BUILTIN_KINDS)
TASK_KINDS = tuple(BUILTIN_KINDS)
DENSE_KINDS = tuple(name for name, k in BUILTIN_KINDS.items() if k.dense)
# A plug-in kind is found when dagc.trainer's registries are first consulted; the hint says so.
_PLUGIN_HINT = ("; a plug-in kind is registered by dagc.trainer.kinds.register_kind or the entry point group "
                "'dagc.kinds' of an installed package")


def task_kind(name: str) -> TaskKind:
    """Takes a kind's name; returns its `TaskKind`. Raises SpecError for an unknown kind."""
    if name not in KINDS:
        raise SpecError(f"unknown task kind {name!r}; choose one of {list(KINDS)}{_PLUGIN_HINT}")
    return KINDS[name]


def check_kind(kind: object, where: str = "task kind") -> TaskKind:
    """Takes a would-be `TaskKind`; returns it. Raises SpecError (naming ``where`` and the field)
    unless it is a `TaskKind` whose fields have their types, ``channels`` is None or >= 1 (None
    for a labelled kind), and ``head`` is the compiler's head for it: ``"aspp"`` when dense,
    ``"linear"`` when not."""
    if not isinstance(kind, TaskKind):
        raise SpecError(f"{where}: expected a dagc.spec.TaskKind, got {type(kind).__name__}")
    name = kind.name
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise SpecError(f"{where}: name must be letters, digits, '_' or '-', got {name!r}")
    for field in ("dense", "labelled"):
        if not isinstance(getattr(kind, field), bool):
            raise SpecError(f"{where} {name!r}: {field} must be True or False, got {getattr(kind, field)!r}")
    ch = kind.channels
    if ch is not None and (isinstance(ch, bool) or not isinstance(ch, int) or ch < 1):
        raise SpecError(f"{where} {name!r}: channels must be None or an integer >= 1, got {ch!r}")
    if kind.labelled and ch is not None:
        raise SpecError(f"{where} {name!r}: a labelled kind outputs its classes; channels must be None")
    if kind.head not in HEADS:
        raise SpecError(f"{where} {name!r}: head must be one of {list(HEADS)}, got {kind.head!r}")
    if kind.head != ("aspp" if kind.dense else "linear"):
        raise SpecError(f"{where} {name!r}: a {'dense' if kind.dense else 'per-image'} kind needs the "
                        f"{'aspp' if kind.dense else 'linear'} head, got {kind.head!r}")
    return kind


def register_kind(kind: TaskKind, where: str = "task kind") -> None:
    """Adds a task kind's structural facts to `KINDS` (what trainer, compiler and runtime share).
    Registering a kind again with identical facts does nothing. Raises SpecError for a malformed
    kind (`check_kind`) or a name already registered with other facts (a built-in one included)."""
    check_kind(kind, where)
    known = KINDS.get(kind.name)
    if known is not None and known != kind:
        what = "the built-in" if kind.name in BUILTIN_KINDS else "the already registered"
        raise SpecError(f"{where} {kind.name!r} clashes with {what} kind {known}; choose another name")
    KINDS[kind.name] = kind


@dataclass(frozen=True)
class TaskSpec:
    """One task: a name, a kind, the number of classes (segmentation/classification) and a head.

    ``classes`` is also the output size of a kind with no fixed channels (``TaskKind.channels``
    None, e.g. ``regression``: the length of the vector predicted per image); None for the others.

    ``head`` defaults to the kind's (`TaskKind.head`): ``"linear"`` (global-average-pooled linear)
    for classification, ``"aspp"`` (DeepLab-v2 atrous spatial pyramid pooling, upsampled to the
    input) otherwise. The kind is checked by `Spec.validate`; an unknown one gets no default head.
    """

    name: str
    kind: str
    classes: int | None = None
    head: str | None = None

    def __post_init__(self) -> None:
        if self.head is None and self.kind in KINDS:
            object.__setattr__(self, "head", KINDS[self.kind].head)

    @property
    def out_channels(self) -> int:
        """Channels of the head's output: ``classes`` for labelled kinds and kinds without fixed
        channels (regression), else the kind's channels."""
        kind = task_kind(self.kind)
        return int(self.classes or 0) if kind.labelled or kind.channels is None else int(kind.channels)

    @property
    def dense(self) -> bool:
        """Whether the task is predicted per pixel. Raises SpecError for an unknown kind."""
        return task_kind(self.kind).dense

    @property
    def labelled(self) -> bool:
        """Whether the task predicts one of its classes. Raises SpecError for an unknown kind."""
        return task_kind(self.kind).labelled


def check_task(t: TaskSpec, where: str) -> None:
    """Raises SpecError (naming ``where`` and the field) unless ``t`` is a `TaskSpec` with a valid
    name, a registered kind, the ``classes`` that kind needs and the kind's head."""
    if not isinstance(t, TaskSpec):
        raise SpecError(f"{where}: expected a dagc.spec.TaskSpec, got {type(t).__name__}")
    if not isinstance(t.name, str) or not t.name or not t.name.replace("_", "").replace("-", "").isalnum():
        raise SpecError(f"{where}.name must be letters, digits, '_' or '-'")
    if t.kind not in KINDS:
        raise SpecError(f"{where}.kind must be one of {list(KINDS)}, got {t.kind!r}{_PLUGIN_HINT}")
    kind = KINDS[t.kind]
    if kind.labelled:
        if isinstance(t.classes, bool) or not isinstance(t.classes, int) or t.classes < 2:
            raise SpecError(f"{where}.classes must be an integer >= 2 for {t.kind}, got {t.classes!r}")
    elif kind.channels is None:
        if isinstance(t.classes, bool) or not isinstance(t.classes, int) or t.classes < 1:
            raise SpecError(f"{where}.classes (the output size of a {t.kind} task) must be an integer >= 1, "
                            f"got {t.classes!r}")
    elif t.classes is not None:
        sized = [k.name for k in KINDS.values() if k.labelled or k.channels is None]
        raise SpecError(f"{where}.classes is only meaningful for {'/'.join(sized)}")
    if t.head not in HEADS:
        raise SpecError(f"{where}.head must be one of {list(HEADS)}, got {t.head!r}")
    if t.head != kind.head:
        what = "dense task kind" if kind.dense else "task kind"
        raise SpecError(f"{where}.head: {what} {t.kind!r} needs the {kind.head!r} head")


@dataclass(frozen=True)
class Spec:
    """A central network (paper Sec. 3.1, appendix A) with its tasks.

    Fields:
        states: the N hidden states, topologically sorted; strides never decrease.
        readout: the read-out state v_L that every read-out edge resizes to.
        flow_constant: M; hidden edges i -> j exist for 0 < j - i <= M.
        tasks: the K tasks.
        in_channels, input_size: the input image (C, (H, W)); H and W divide by every stride.
        shared_input: True if all tasks read one image; False if each task has its own input.
        head_channels, aspp_rates, head_dropout: the ASPP heads' width, dilation rates, dropout.
        refine_channels: width of the dense heads' refinement at the input's resolution (0: none).
        downsample: where a stride-raising hidden edge downsamples (`dagc.network_file.DOWNSAMPLES`).
        preset: the preset the spec came from (informational).
    """

    states: tuple[StateSpec, ...]
    readout: StateSpec
    flow_constant: int
    tasks: tuple[TaskSpec, ...]
    in_channels: int = 3
    input_size: tuple[int, int] = (32, 32)
    shared_input: bool = True
    head_channels: int = 64
    aspp_rates: tuple[int, ...] = (1, 2, 3, 4)
    head_dropout: float = 0.0
    refine_channels: int = 0
    downsample: str = DOWNSAMPLES[0]
    preset: str = "custom"

    def __post_init__(self) -> None:
        # A task made before its (plug-in) kind was registered got no default head; it gets it now.
        if any(isinstance(t, TaskSpec) and t.head is None for t in self.tasks):
            object.__setattr__(self, "tasks", tuple(replace(t) if isinstance(t, TaskSpec) and t.head is None else t
                                                    for t in self.tasks))
        self.validate()

    # ------------------------------------------------------------------ structure
    @property
    def n_states(self) -> int:
        return len(self.states)

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def hidden_edges(self) -> list[tuple[int, int]]:
        """The flow-restricted hidden edges (i, j), 0-based, i < j <= i + M, in row-major order."""
        n, m = self.n_states, self.flow_constant
        return [(i, j) for i in range(n) for j in range(i + 1, min(n, i + m + 1))]

    def n_edges(self) -> int:
        """All edges of the central network: hidden edges plus N read-in and N read-out edges."""
        return len(self.hidden_edges()) + 2 * self.n_states

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise SpecError(f"unknown task {name!r}; the spec has tasks {list(self.task_names)}")

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise SpecError naming the first field that is invalid. The network's rules are
        `dagc.network_file`'s (`check_states`, `check_input_size`, `check_heads`), shared with
        network files; a spec's M is not bounded by N - 1 (`complete_dag` and the flow-constant
        override produce any M >= 1)."""
        check_states(self.states, self.readout, self.flow_constant, "spec.")
        if isinstance(self.in_channels, bool) or not isinstance(self.in_channels, int) or self.in_channels < 1:
            raise SpecError(f"spec.in_channels must be a positive integer, got {self.in_channels!r}")
        check_input_size(self.input_size, tuple(s.stride for s in (*self.states, self.readout)), "spec.")
        if not self.tasks:
            raise SpecError("spec.tasks: at least one task is needed")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise SpecError(f"spec.tasks: task names must be unique, got {names}")
        for t in self.tasks:
            check_task(t, f"spec.tasks[{t.name!r}]")
        check_heads(self.head_channels, self.aspp_rates, self.head_dropout, "spec.", self.refine_channels)
        check_downsample(self.downsample, "spec.")

    def max_stride(self) -> int:
        return max(s.stride for s in (*self.states, self.readout))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["aspp_rates"] = list(self.aspp_rates)
        # The paper's values are left out: specs stored before these options read the same.
        if self.downsample == DOWNSAMPLES[0]:
            del d["downsample"]
        if not self.refine_channels:
            del d["refine_channels"]
        # A plug-in kind's structural facts travel with the spec, so that the compiler and the
        # runtime read it without the plug-in; built-in kinds leave the spec as it always was.
        plugged = {t.kind: KINDS[t.kind] for t in self.tasks if t.kind not in BUILTIN_KINDS}
        if plugged:
            d["kinds"] = {name: {k: v for k, v in asdict(kind).items() if k != "name"}
                          for name, kind in sorted(plugged.items())}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Spec:
        """Build a spec from `to_dict` output; raises SpecError on a missing or malformed field."""
        if not isinstance(d, dict):
            raise SpecError("spec: expected a JSON object")
        known = set(cls.__dataclass_fields__) | {"kinds"}
        unknown = set(d) - known
        if unknown:
            raise SpecError(f"spec: unknown field(s) {sorted(unknown)}")
        _register_spec_kinds(d.get("kinds", {}))
        try:
            kw = {k: v for k, v in d.items() if k != "kinds"}
            kw["states"] = tuple(StateSpec(**s) for s in d["states"])
            kw["readout"] = StateSpec(**d["readout"])
            kw["tasks"] = tuple(TaskSpec(**t) for t in d["tasks"])
            if "input_size" in d:
                kw["input_size"] = tuple(d["input_size"])
            if "aspp_rates" in d:
                kw["aspp_rates"] = tuple(d["aspp_rates"])
        except KeyError as e:
            raise SpecError(f"spec: missing field {e.args[0]!r}") from None
        except TypeError as e:
            raise SpecError(f"spec: malformed entry ({e})") from None
        return cls(**kw)

    @classmethod
    def from_network(cls, network: Network, tasks: Sequence[TaskSpec], *, flow_constant: int | None = None,
                     in_channels: int = 3, input_size: tuple[int, int] | None = None,
                     shared_input: bool = True) -> Spec:
        """Takes a `Network` and the tasks; returns their spec, named after the network
        (``preset``). ``flow_constant`` overrides the network's M; ``input_size`` (H, W) defaults
        to the network's. Raises SpecError for an invalid combination (a task, an input size not
        divisible by every stride) or when neither gives an input size."""
        size = input_size if input_size is not None else network.input_size
        if size is None:
            where = network.source or f"network {network.name!r}"
            raise SpecError(f"{where}: no input_size; give the input size (H, W) the spec is for")
        return cls(states=network.states, readout=network.readout,
                   flow_constant=network.flow_constant if flow_constant is None else flow_constant,
                   tasks=tuple(tasks), in_channels=in_channels, input_size=tuple(size), shared_input=shared_input,
                   head_channels=network.head_channels, aspp_rates=network.aspp_rates,
                   head_dropout=network.head_dropout, downsample=network.downsample,
                   refine_channels=network.refine_channels, preset=network.name)

    @classmethod
    def from_json(cls, text: str) -> Spec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SpecError(f"spec: not valid JSON ({e})") from None


def _register_spec_kinds(kinds: object) -> None:
    """Registers the plug-in kinds a spec carries (``kinds``: name -> structural facts)."""
    if not isinstance(kinds, dict):
        raise SpecError("spec.kinds: expected a JSON object (kind name -> its facts)")
    for name, facts in kinds.items():
        if not isinstance(facts, dict):
            raise SpecError(f"spec.kinds[{name!r}]: expected a JSON object")
        try:
            kind = TaskKind(name=name, **facts)
        except TypeError as e:
            raise SpecError(f"spec.kinds[{name!r}]: malformed ({e})") from None
        register_kind(kind, f"spec.kinds[{name!r}]")


def preset_size(name: str) -> tuple[int, int]:
    """(N, M) of preset ``name`` (`PRESETS`): its number of hidden states and its default flow
    constant. Raises SpecError if the preset is unknown."""
    net = preset_network(name)
    return net.n_states, net.flow_constant


def preset(
    name: str,
    tasks: Sequence[TaskSpec],
    *,
    flow_constant: int | None = None,
    in_channels: int = 3,
    input_size: tuple[int, int] | None = None,
    shared_input: bool = True,
) -> Spec:
    """Build a spec from a named preset (`PRESETS`, each a network file shipped in
    ``dagc/networks/``) and the given tasks; see `Spec.from_network` for the options.

    Raises SpecError for an unknown preset or an invalid combination (e.g. an input size not
    divisible by the preset's largest stride).
    """
    return Spec.from_network(preset_network(name), tasks, flow_constant=flow_constant, in_channels=in_channels,
                             input_size=input_size, shared_input=shared_input)


__all__ = ["Spec", "StateSpec", "TaskSpec", "TaskKind", "Network", "preset", "preset_size", "task_kind", "PRESETS",
           "KINDS", "BUILTIN_KINDS", "TASK_KINDS", "DENSE_KINDS", "HEADS", "check_kind", "check_task",
           "register_kind"]
