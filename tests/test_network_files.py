"""Network files (FORMAT.md, "Network files"): the presets are such files and build the specs they
always built; `dagc train --network` with the tiny preset's own file trains bit for bit as `--preset
tiny`; a run records its network, so resuming does not read the file again; hostile files are one
line and exit 2; `dagc inspect --network` prints the network, its parameters and FLOPs."""

import json
import re
import shutil

import pytest
import torch

from dagc.checkpoint import load_checkpoint
from dagc.costs import supernet_costs
from dagc.errors import ConfigError, SpecError
from dagc.network_file import MAX_FILE_BYTES, Network, preset_network, preset_path
from dagc.spec import PRESETS, Spec, StateSpec, TaskSpec, preset, preset_size
from dagc.tools.cli import main
from dagc.trainer.config import TrainConfig
from dagc.trainer.train import train

TASKS = (TaskSpec("seg", "segmentation", 13), TaskSpec("depth", "depth"), TaskSpec("cls", "classification", 20))
CLI_FAST = ["--warmup-iters", "2", "--search-iters", "2", "--finetune-iters", "2", "--batch-size", "4", "--quiet"]
FAST = dict(warmup_iters=2, search_iters=2, finetune_iters=2, batch_size=4, n_train=16, n_test=8)


def _states(channels, strides):
    return tuple(StateSpec(c, s) for c, s in zip(channels, strides, strict=True))


# The presets exactly as dagc/spec.py spelled them before they became files (commit 43f2cef).
OLD_PRESETS = {
    "vgg16": dict(
        states=_states([64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512],
                       [1, 1, 2, 2, 4, 4, 4, 8, 8, 8, 16, 16]),
        readout=StateSpec(512, 16), flow_constant=3, head_channels=1024,
        aspp_rates=(6, 12, 18, 24), head_dropout=0.5, input_size=(64, 64),
    ),
    "omniglot": dict(
        states=_states([64] * 8, [1, 1, 2, 2, 4, 4, 8, 8]),
        readout=StateSpec(64, 8), flow_constant=3, head_channels=64,
        aspp_rates=(1, 2, 3, 4), head_dropout=0.0, input_size=(8, 8),
    ),
    "tiny": dict(
        states=_states([16, 16, 32, 32, 32, 32], [1, 1, 2, 2, 4, 4]),
        readout=StateSpec(32, 4), flow_constant=3, head_channels=32,
        aspp_rates=(1, 2, 3, 4), head_dropout=0.0, input_size=(32, 32),
    ),
}


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _tiny_dict():
    return json.loads(preset_path("tiny").read_text())


def _write(path, value):
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return path


# ------------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("name", sorted(OLD_PRESETS))
@pytest.mark.parametrize("options", [
    {}, dict(flow_constant=1), dict(flow_constant=40), dict(input_size=(64, 64)),
    dict(in_channels=1, shared_input=False),
])
def test_presets_build_the_specs_of_their_old_literal_values(name, options):
    assert PRESETS == ("tiny", "tiny-v2", "omniglot", "vgg16")
    kw = {**OLD_PRESETS[name], **{k: v for k, v in options.items() if k in ("flow_constant", "input_size")}}
    old = Spec(tasks=TASKS, in_channels=options.get("in_channels", 3), shared_input=options.get("shared_input", True),
               preset=name, **kw)
    new = preset(name, TASKS, **options)
    assert new == old and new.to_json() == old.to_json()
    assert preset_size(name) == (len(OLD_PRESETS[name]["states"]), 3)


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_file_is_an_ordinary_network_file(name):
    net = Network.load(preset_path(name))
    assert net == preset_network(name) and net.name == name and net.description
    assert Network.from_dict(net.to_dict()) == net
    assert json.loads(preset_path(name).read_text()) == net.to_dict()


# ------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def preset_run(tmp_path_factory):
    """`dagc train --preset tiny` (the synthetic dataset's default sizes: the CLI has no sample counts)."""
    run = tmp_path_factory.mktemp("preset") / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(run), "--preset", "tiny", *CLI_FAST])
    assert e.value.code == 0
    return run


def _same_run(a, b):
    """Every tensor of every checkpoint bit for bit, the spec and every metric but the time."""
    for name in ("warmup.safetensors", "search.safetensors", "checkpoint.safetensors", "state.safetensors"):
        ca, cb = load_checkpoint(a / name), load_checkpoint(b / name)
        assert ca.tensors.keys() == cb.tensors.keys(), name
        for k in ca.tensors:
            assert torch.equal(ca.tensors[k], cb.tensors[k]), f"{name}: {k}"
        assert ca.spec == cb.spec and ca.spec.to_json() == cb.spec.to_json(), name
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    skip = ("config", "train_seconds")
    assert {k: v for k, v in ma.items() if k not in skip} == {k: v for k, v in mb.items() if k not in skip}
    return ma, mb


def test_the_tiny_presets_own_file_trains_bit_for_bit_as_the_preset(preset_run, tmp_path, capsys):
    copy = shutil.copy(preset_path("tiny"), tmp_path / "net.json")
    run = tmp_path / "run"
    code, out, err = _cli(["train", "--out", run, "--network", copy, *CLI_FAST], capsys)
    assert code == 0, err
    ma, mb = _same_run(preset_run, run)
    assert ma["config"]["preset"] == "tiny" and ma["config"]["network"] is None
    # The run records the network itself, not the path it was read from.
    assert mb["config"]["preset"] is None and mb["config"]["network"] == _tiny_dict()
    assert str(copy) not in json.dumps(mb["config"])
    assert load_checkpoint(run / "checkpoint.safetensors").json("config")["network"] == _tiny_dict()


def test_a_resumed_run_trains_the_recorded_network_not_the_file(tmp_path):
    net = _write(tmp_path / "net.json", _tiny_dict())
    full, part = tmp_path / "full", tmp_path / "part"
    train(TrainConfig(preset="tiny", **FAST), full, progress=False)

    class Stop(Exception):
        pass

    def stop_in_search(run):
        if run.stage == "search" and run.step == 1:
            raise Stop

    with pytest.raises(Stop):
        train(TrainConfig(network=str(net), **FAST), part, progress=False, on_step=stop_in_search)
    # The file changes (a network that would not even fit the state), then disappears.
    _write(net, {**_tiny_dict(), "flow_constant": 1, "head_channels": 8})
    assert TrainConfig(network=str(net)).network.flow_constant == 1
    net.unlink()
    train(None, part, resume=True, progress=False)
    a = load_checkpoint(full / "checkpoint.safetensors")
    b = load_checkpoint(part / "checkpoint.safetensors")
    assert a.spec == b.spec and a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        torch.testing.assert_close(a.tensors[k], b.tensors[k], msg=k)


def test_the_configuration_holds_the_network_and_checks_against_its_n_and_m(tmp_path):
    small = _write(tmp_path / "small.json", {"states": [{"channels": 8, "stride": 1}] * 3,
                                             "readout": {"channels": 8, "stride": 1}, "flow_constant": 2})
    cfg = TrainConfig(network=str(small))
    assert cfg.preset is None and cfg.network.n_states == 3 and cfg.network.name == "custom"
    stored = cfg.to_dict()
    small.unlink()  # from_dict reads the recorded network, never the file
    assert TrainConfig.from_dict(json.loads(json.dumps(stored))) == cfg
    _write(small, json.dumps(stored["network"]))
    with pytest.raises(ConfigError, match=r"1\.\.2 for network 'custom'"):
        TrainConfig(network=str(small), flow_constant=3)
    with pytest.raises(ConfigError, match=r"\[0, 3\].*N = 3, M = 2"):
        TrainConfig(network=str(small), kappa=4.0)
    assert TrainConfig(network=str(small), flow_constant=2, kappa=3.0).kappa == 3.0
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(network=str(small), preset="tiny")
    with pytest.raises(ConfigError, match="config.network: states"):
        TrainConfig.from_dict({**stored, "network": {**stored["network"], "states": []}})


def test_a_network_that_does_not_fit_the_data_is_refused_before_training(tmp_path):
    coarse = _write(tmp_path / "coarse.json", {**_tiny_dict(), "readout": {"channels": 8, "stride": 64},
                                               "input_size": [64, 64]})
    with pytest.raises(ConfigError, match=r"network 'tiny' \(.*coarse.json\) does not fit dataset 'synthetic'"):
        train(TrainConfig(network=str(coarse), **FAST), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "state.safetensors").exists()


def test_resume_refuses_a_network_option(tmp_path, capsys):
    code, _, err = _cli(["train", "--resume", tmp_path, "--network", preset_path("tiny")], capsys)
    assert code == 2 and "own configuration" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ hostile files
def _tiny_with(**change):
    return {**_tiny_dict(), **change}


def _tiny_without(key):
    return {k: v for k, v in _tiny_dict().items() if k != key}


def _states_with(idx, **change):
    states = _tiny_dict()["states"]
    states[idx] = {**states[idx], **change}
    return _tiny_with(states=states)


HOSTILE = [
    ("not-json", "{\"states\": [", "not valid JSON"),
    ("not-an-object", [1, 2], "one JSON object"),
    ("unknown-field", _tiny_with(colour=1), "unknown field(s) ['colour']"),
    ("missing-field", _tiny_without("readout"), "missing field 'readout'"),
    ("negative-channels", _states_with(1, channels=-16), "states[1].channels must be a positive integer"),
    ("zero-readout-stride", _tiny_with(readout={"channels": 32, "stride": 0}), "readout.stride"),
    ("decreasing-stride", _states_with(3, stride=1), "states[3].stride must be a multiple"),
    ("stride-not-a-multiple", _states_with(3, stride=3), "states[3].stride must be a multiple of the previous state's stride 2"),
    ("stride-not-dividing-the-input", _tiny_with(input_size=[30, 30]), "input_size (30, 30) must be divisible"),
    ("m-below-1", _tiny_with(flow_constant=0), "flow_constant (M) must be an integer >= 1"),
    ("m-above-n-1", _tiny_with(flow_constant=6), "flow_constant (M) must be at most 5"),
    ("empty-states", _tiny_with(states=[]), "states: a central network needs at least one hidden state"),
    ("channels-as-text", _states_with(0, channels="16"), "states[0].channels must be a positive integer, got '16'"),
    ("channels-as-bool", _states_with(0, channels=True), "states[0].channels"),
    ("fractional-m", _tiny_with(flow_constant=2.5), "flow_constant"),
    ("states-as-object", _tiny_with(states={"channels": 16, "stride": 1}), "states must be a list"),
    ("state-with-extra-key", _states_with(0, kernel=5), "states[0] must be an object"),
    ("readout-as-list", _tiny_with(readout=[32, 4]), "readout must be an object"),
    ("rates-as-text", _tiny_with(aspp_rates="1,2"), "aspp_rates must be a list"),
    ("empty-rates", _tiny_with(aspp_rates=[]), "aspp_rates must be positive integers"),
    ("dropout-as-text", _tiny_with(head_dropout="0.5"), "head_dropout must be a number in [0, 1)"),
    ("dropout-one", _tiny_with(head_dropout=1.0), "head_dropout"),
    ("dropout-nan", "{\"states\": [{\"channels\": 8, \"stride\": 1}], \"readout\": {\"channels\": 8, \"stride\": 1},"
                    " \"flow_constant\": 1, \"head_dropout\": NaN}", "head_dropout"),
    ("input-size-one-number", _tiny_with(input_size=[32]), "input_size must be two positive integers"),
    ("null-option", _tiny_with(head_channels=None), "head_channels must be a positive integer, got None"),
    ("bad-name", _tiny_with(name="my net!"), "name must be letters"),
    ("deeply-nested", "[" * 100000 + "]" * 100000, "not valid JSON"),
]


@pytest.mark.parametrize("content, words", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
@pytest.mark.parametrize("command", ["train", "inspect"])
def test_a_hostile_network_file_is_one_line_naming_file_and_field(tmp_path, capsys, content, words, command):
    bad = _write(tmp_path / "bad.json", content)
    args = ["train", "--out", tmp_path / "run", *CLI_FAST] if command == "train" else ["inspect"]
    code, out, err = _cli([*args, "--network", bad], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"dagc: error: {bad}: ") and words in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["missing", "directory", "not-utf8", "too-large"])
def test_a_network_path_that_is_no_readable_file_is_one_line(tmp_path, capsys, case):
    path = tmp_path / "net.json"
    if case == "directory":
        path.mkdir()
    elif case == "not-utf8":
        path.write_bytes(b"\xff\xfe{}")
    elif case == "too-large":
        path.write_text(" " * (MAX_FILE_BYTES + 1))
    code, _, err = _cli(["train", "--out", tmp_path / "run", "--network", path], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"{path}: " in err, err
    assert not (tmp_path / "run").exists()


def test_a_spec_refuses_a_bool_where_an_integer_belongs():
    with pytest.raises(SpecError, match=r"spec.states\[0\].channels"):
        Spec(states=(StateSpec(True, 1),), readout=StateSpec(8, 1), flow_constant=1, tasks=TASKS[1:2])
    with pytest.raises(SpecError, match="spec.head_dropout"):
        Spec(**{**OLD_PRESETS["tiny"], "head_dropout": "0"}, tasks=TASKS)


# ------------------------------------------------------------------------------------------ inspect
def _mflops(spec):
    return f"{supernet_costs(spec)['flops'] / 1e6:.2f}"


def test_inspect_prints_states_edges_parameters_and_flops_per_input_size(preset_run, tmp_path, capsys):
    net = shutil.copy(preset_path("tiny"), tmp_path / "net.json")
    code, out, err = _cli(["inspect", "--network", net], capsys)
    assert code == 0, err
    assert "N = 6 hidden states, flow constant M = 3" in out and "name 'tiny'" in out
    assert re.search(r"^4\s+32\s+4\s+1 2 3$", out, re.M)  # state 4: 32 channels, stride 4, edges from 1, 2, 3
    assert re.search(r"^read-out\s+32\s+4\s", out, re.M)
    assert "edges: 12 hidden, 6 read-in" in out and "24 per task" in out
    # The default single task's supernet, whose parameters a trained run of one depth task has too.
    spec = preset("tiny", [TaskSpec("depth", "depth")])
    assert f"parameters (unpruned supernet): {supernet_costs(spec)['params']:,}" in out
    assert re.search(rf"^32x32\s.*\s{_mflops(spec)}$", out, re.M)

    tasks = "segmentation:5,depth,normal,edge"
    code, out, _ = _cli(["inspect", "--network", net, "--tasks", tasks, "--input-size", "32x32",
                         "--input-size", "64x48"], capsys)
    assert code == 0
    trained = json.loads((preset_run / "metrics.json").read_text())
    specs = [Spec.from_dict({**trained["spec"], "input_size": size}) for size in ([32, 32], [64, 48])]
    # The synthetic dataset's segmentation has 5 classes: the count is the trained supernet's.
    assert specs[0].task("segmentation").classes == 5
    assert f"parameters (unpruned supernet): {trained['parameters']['supernet']:,}" in out
    for size, spec in zip(("32x32", "64x48"), specs):
        assert re.search(rf"^{size}\s.*\s{_mflops(spec)}$", out, re.M), size


@pytest.mark.parametrize("args, words", [
    ([], "give a checkpoint or artifact PATH, or --network FILE"),
    (["some.ckpt", "--network", "net.json"], "not both"),
    (["some.ckpt", "--tasks", "depth"], "describe a --network file"),
    (["--network", "NET", "--tasks", "colour"], "--tasks: 'colour'"),
    (["--network", "NET", "--tasks", "seg=segmentation"], "classes must be an integer >= 2"),
    (["--network", "NET", "--input-size", "30x30"], "must be divisible by every stride"),
    (["--network", "NET", "--input-size", "big"], "--input-size takes comma-separated integers"),
])
def test_inspect_refuses_bad_options_in_one_line(tmp_path, capsys, args, words):
    args = [str(preset_path("tiny")) if a == "NET" else a for a in args]
    code, _, err = _cli(["inspect", *args], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err


def test_inspect_needs_an_input_size_the_file_does_not_give(tmp_path, capsys):
    net = _write(tmp_path / "net.json", _tiny_without("input_size"))
    code, _, err = _cli(["inspect", "--network", net], capsys)
    assert code == 2 and "no input_size; give --input-size" in err
    code, out, _ = _cli(["inspect", "--network", net, "--input-size", "16x16"], capsys)
    assert code == 0 and re.search(r"^16x16\s", out, re.M)
