"""The spec: presets, flow-restricted edges, validation messages and JSON round trip."""

import pytest

from dagc.errors import SpecError
from dagc.spec import DENSE_KINDS, KINDS, PRESETS, TASK_KINDS, Spec, StateSpec, TaskSpec, preset, task_kind

TASKS = [TaskSpec("seg", "segmentation", 13), TaskSpec("depth", "depth"), TaskSpec("cls", "classification", 20)]


def test_vgg16_preset_follows_appendix_table_7():
    spec = preset("vgg16", TASKS[:2])
    assert spec.n_states == 12
    assert [s.channels for s in spec.states] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512]
    assert [s.stride for s in spec.states] == [1, 1, 2, 2, 4, 4, 4, 8, 8, 8, 16, 16]
    assert spec.readout == StateSpec(512, 16)
    assert preset("omniglot", TASKS[2:]).n_states == 8


@pytest.mark.parametrize("m", [1, 2, 3, 5, 12, 40])
def test_hidden_edges_respect_the_flow_constant(m):
    spec = preset("vgg16", TASKS[:1], flow_constant=m)
    edges = spec.hidden_edges()
    assert all(0 < j - i <= m for i, j in edges)
    n = spec.n_states
    assert len(edges) == sum(min(m, n - 1 - i) for i in range(n))
    assert edges == sorted(edges)
    assert spec.n_edges() == len(edges) + 2 * n


@pytest.mark.parametrize("name", PRESETS)
def test_json_round_trip(name):
    spec = preset(name, TASKS, flow_constant=4)
    again = Spec.from_json(spec.to_json())
    assert again == spec
    assert again.to_json() == spec.to_json()


@pytest.mark.parametrize("change, field", [
    (dict(flow_constant=0), "flow_constant"),
    (dict(input_size=(30, 30)), "input_size"),
    (dict(tasks=(TaskSpec("x", "segmentation"),)), "classes"),
    (dict(tasks=(TaskSpec("x", "colour"),)), "kind"),
    (dict(tasks=(TaskSpec("x", "depth", head="linear"),)), "head"),
    (dict(tasks=(TaskSpec("x", "depth"), TaskSpec("x", "edge"))), "unique"),
    (dict(tasks=()), "tasks"),
    (dict(states=(StateSpec(8, 2), StateSpec(8, 1))), "stride"),
    (dict(states=(StateSpec(0, 1),)), "channels"),
    (dict(head_dropout=1.5), "head_dropout"),
])
def test_validation_names_the_field(change, field):
    base = preset("tiny", TASKS[:2]).to_dict()
    kw = {**{k: v for k, v in base.items()}, **change}
    kw["states"] = change.get("states", tuple(StateSpec(**s) for s in base["states"]))
    kw["readout"] = StateSpec(**base["readout"])
    kw["tasks"] = change.get("tasks", tuple(TaskSpec(**t) for t in base["tasks"]))
    kw["input_size"] = tuple(kw["input_size"])
    kw["aspp_rates"] = tuple(kw["aspp_rates"])
    with pytest.raises(SpecError, match=field):
        Spec(**kw)


def test_unknown_preset_and_malformed_json():
    with pytest.raises(SpecError, match="unknown preset"):
        preset("resnet", TASKS)
    with pytest.raises(SpecError, match="JSON"):
        Spec.from_json("{not json")
    with pytest.raises(SpecError, match="missing field 'states'"):
        Spec.from_dict({"readout": {"channels": 1, "stride": 1}})
    with pytest.raises(SpecError, match="unknown field"):
        Spec.from_dict({**preset("tiny", TASKS).to_dict(), "colour": 1})


def test_every_task_kind_is_registered_once_with_its_structure():
    assert TASK_KINDS == tuple(KINDS) and DENSE_KINDS == tuple(k for k in KINDS if KINDS[k].dense)
    for name, kind in KINDS.items():
        sized = kind.labelled or kind.channels is None  # regression: the task gives its vector's length
        task = TaskSpec("t", name, 4 if sized else None)
        assert task_kind(name) is kind and task.head == kind.head
        assert task.dense == kind.dense and task.labelled == kind.labelled
        assert task.out_channels == (4 if sized else kind.channels)
    assert TaskSpec("n", "normal").out_channels == 3 and TaskSpec("c", "classification", 7).head == "linear"
    with pytest.raises(SpecError, match="unknown task kind 'colour'"):
        task_kind("colour")
