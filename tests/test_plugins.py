"""Plug-ins without editing dagc: a dataset and a task kind from a package's entry points (groups
``dagc.datasets`` and ``dagc.kinds``) work from the CLI, and a broken plug-in ends in one line
naming it, exit code 2 and nothing written. Each test writes a real installed-looking package
(a module and its ``*.dist-info`` with ``entry_points.txt``) into tmp_path and puts that folder on
sys.path, so `importlib.metadata` finds it as it finds any installed distribution."""

import dataclasses
import json
import sys
import textwrap

import numpy as np
import pytest

import dagc.spec as core
from dagc.errors import PluginError, SpecError
from dagc.spec import TaskKind, TaskSpec, preset
from dagc.tools.cli import main
from dagc.trainer import datasets, kinds
from dagc.trainer.regression import RegressionMeter, median_vector

FAST = ["--warmup-iters", "2", "--search-iters", "2", "--finetune-iters", "2", "--batch-size", "4",
        "--stats-batches", "0", "--quiet"]

# The plug-in's module: a dense kind "heat" (2 channels) and a dataset "theirs" with a heat task
# and a regression task (a 3-vector per image). BROKEN is substituted by each hostile case.
MODULE = '''
import numpy as np
from dagc.spec import TaskKind, TaskSpec
from dagc.trainer.data import Dataset, MultiTaskData, Split
from dagc.trainer.kinds import KindTraining
from dagc.trainer.losses import regression_loss
from dagc.trainer.metrics import Meter


class HeatMeter(Meter):
    def __init__(self, task, edge_max_dist=0.0):
        super().__init__(task, edge_max_dist)
        self.total, self.count = 0.0, 0

    def update(self, pred, target):
        self.total += float(np.abs(np.asarray(pred) - np.asarray(target)).sum())
        self.count += np.asarray(target).size

    def result(self):
        return {"abs_err": self.total / self.count}


def mean_map(task, train_targets, shape):
    return np.broadcast_to(train_targets.mean(axis=(0, 2, 3)).reshape(1, -1, 1, 1).astype(np.float32), shape)


HEAT = TaskKind("heat", dense=True, labelled=False, channels=2, head="aspp")
KIND = (HEAT, KindTraining(regression_loss, None, HeatMeter, "abs_err", ("abs_err",), mean_map))
TASKS = {"heat": TaskSpec("heat", "heat"), "vec": TaskSpec("vec", "regression", 3)}


def _split(rng, n, h, w):
    x = rng.standard_normal((n, 3, h, w)).astype(np.float32)
    return x, {"heat": np.abs(x[:, :2]).astype(np.float32), "vec": x.mean(axis=(2, 3)).astype(np.float32)}


def load(opts):
    rng = np.random.default_rng(opts.seed)
    h, w = opts.size
    xa, ya = _split(rng, opts.n_train, h, w)
    xb, yb = _split(rng, opts.n_test, h, w)
    pick = lambda y: {t: y[t] for t in opts.tasks}
    return MultiTaskData("theirs", 3, (h, w), True, tuple(TASKS[t] for t in opts.tasks),
                         Split(xa, pick(ya)), Split(xb, pick(yb)))


DATASET = Dataset("theirs", load, preset="tiny", on_disk=False, tasks=("heat", "vec"), input_size=(16, 16),
                  n_train=16, n_test=8)


def dataset():
    return DATASET
'''
ENTRY_POINTS = {"dagc.datasets": {"theirs": "{m}:DATASET"}, "dagc.kinds": {"heat": "{m}:KIND"}}


def _reset() -> None:
    """Forget every plug-in: the registries as dagc ships them, nothing loaded yet."""
    datasets.REGISTRY.clear()
    datasets.REGISTRY.update(datasets.BUILTIN)
    datasets.PLUGINS.clear()
    datasets._loaded = False
    for table, built_in in ((kinds.TRAINING, kinds.BUILTIN_TRAINING), (core.KINDS, core.BUILTIN_KINDS)):
        table.clear()
        table.update(built_in)
    kinds.PRIMARY.clear()
    kinds.PRIMARY.update({k: (t.primary, t.higher_is_better) for k, t in kinds.TRAINING.items()})
    kinds.DELTA_METRICS.clear()
    kinds.DELTA_METRICS.update({k: t.delta_metrics for k, t in kinds.TRAINING.items()})
    kinds._loaded = False


@pytest.fixture
def install(tmp_path, monkeypatch, request):
    """install(extra=..., entry_points=...): writes the plug-in package into tmp_path/site (a
    module named after the test, so no two tests share one) and puts it on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    module = "plug_" + "".join(c if c.isalnum() else "_" for c in request.node.name)

    def _install(extra: str = "", entry_points: dict | None = None) -> str:
        (site / f"{module}.py").write_text(MODULE + textwrap.dedent(extra))
        dist = site / f"{module}-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
        groups = ENTRY_POINTS if entry_points is None else entry_points
        (dist / "entry_points.txt").write_text("".join(
            f"[{g}]\n" + "".join(f"{n} = {v.format(m=module)}\n" for n, v in eps.items()) for g, eps in groups.items()))
        monkeypatch.syspath_prepend(str(site))
        return module

    _reset()
    yield _install
    _reset()


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_a_plugin_dataset_and_kind_train_compile_and_are_scored_from_the_cli(install, tmp_path, capsys):
    install()
    run = tmp_path / "run"
    code, out, err = _run(["train", "--out", str(run), "--dataset", "theirs", *FAST], capsys)
    assert code == 0, err
    final = json.loads((run / "metrics.json").read_text())["final"]
    assert set(final["vec"]) >= {"mae", "rmse"} and 0 <= final["vec"]["mae"] <= final["vec"]["rmse"]
    assert "abs_err" in final["heat"]
    # The spec carries the plug-in kind's structure: compiling needs no plug-in installed.
    _reset()
    sys.path.remove(str(tmp_path / "site"))  # uninstalled (the fixture restores sys.path)
    code, out, err = _run(["compile", str(run / "checkpoint.safetensors"), "--out", str(tmp_path / "art")], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["tasks"]["vec"]["output_shape"] == ["batch", 3]
    assert manifest["tasks"]["heat"]["output_shape"] == ["batch", 2, 16, 16]
    assert manifest["spec"]["kinds"] == {"heat": {"dense": True, "labelled": False, "channels": 2, "head": "aspp"}}
    # ... and so does running it: the regression task writes its vector, the plug-in kind its map.
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((3, 16, 16), dtype=np.float32))
    code, out, err = _run(["run", str(tmp_path / "art"), str(tmp_path / "x.npy"), "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert len(json.loads((tmp_path / "o" / "x_vec.json").read_text())["values"]) == 3
    assert np.load(tmp_path / "o" / "x_heat.npy").shape == (2, 16, 16)


def test_a_callable_entry_point_and_the_python_api(install):
    install(entry_points={"dagc.datasets": {"theirs": "{m}:dataset"}, "dagc.kinds": {"heat": "{m}:KIND"}})
    data = datasets.load_dataset("theirs", tasks=("vec", "heat"), n_train=4, n_test=2)
    assert [t.name for t in data.tasks] == ["vec", "heat"] and data.train.targets["vec"].shape == (4, 3)
    assert kinds.primary_metric("heat") == ("abs_err", False) and kinds.primary_metric("regression") == ("mae", False)
    # Registering the identical record again is a no-op; the API refuses what the entry points would.
    datasets.register_dataset(datasets.dataset("theirs"))
    with pytest.raises(PluginError, match="dataset 'synthetic' clashes with the built-in dataset"):
        datasets.register_dataset(dataclasses.replace(datasets.dataset("theirs"), name="synthetic"))


def test_a_spec_of_an_unregistered_kind_without_its_facts_is_one_clear_line(install):
    install(entry_points={})
    with pytest.raises(SpecError, match="'dagc.kinds'"):
        preset("tiny", [TaskSpec("h", "heat")])
    # With its facts the spec loads (compile, runtime), but training or scoring it needs the plug-in.
    core.register_kind(TaskKind("heat", dense=True, labelled=False, channels=2, head="aspp"))
    with pytest.raises(SpecError, match="need its plug-in installed"):
        kinds.kind_training(TaskSpec("h", "heat"))


def test_regression_kind_meter_and_constant():
    task = TaskSpec("v", "regression", 2)
    assert task.out_channels == 2 and not task.dense and task.head == "linear"
    meter = RegressionMeter(task)
    meter.update(np.array([[1.0, 2.0]]), np.array([[0.0, 4.0]]))
    assert meter.result() == pytest.approx({"mae": 1.5, "rmse": np.sqrt(2.5)})
    const = median_vector(task, np.array([[0.0, 1.0], [1.0, 5.0], [3.0, 9.0]], dtype=np.float32), (4, 2))
    assert const.shape == (4, 2) and const[0].tolist() == [1.0, 5.0]
    with pytest.raises(SpecError, match="output size"):
        preset("tiny", [TaskSpec("v", "regression")])


# Each hostile case: what to add to the module, the entry points, and words the one line must hold.
BAD = {
    "fails to import": ("raise ImportError('no module named torchvision_extra')\n",
                        {"dagc.datasets": {"theirs": "{m}:DATASET"}},
                        ["'theirs'", "fails to import", "ImportError"]),
    "missing attribute": ("", {"dagc.datasets": {"theirs": "{m}:NOPE"}}, ["'theirs'", "fails to import", "NOPE"]),
    "wrong type": ("WRONG = {'name': 'theirs'}\n", {"dagc.datasets": {"theirs": "{m}:WRONG"}},
                   ["'theirs'", "expected a dagc.trainer.data.Dataset, got dict"]),
    "callable raises": ("def boom():\n    raise RuntimeError('disk on fire')\n",
                        {"dagc.datasets": {"theirs": "{m}:boom"}}, ["'theirs'", "RuntimeError", "disk on fire"]),
    "name differs": ("", {"dagc.datasets": {"mine": "{m}:DATASET"}}, ["'mine'", "got dataset 'theirs'"]),
    "clashes with built-in dataset": (
        "import dataclasses\nCLASH = dataclasses.replace(DATASET, name='synthetic')\n",
        {"dagc.datasets": {"synthetic": "{m}:CLASH"}}, ["'synthetic'", "clashes with the built-in dataset"]),
    "bad preset": ("import dataclasses\nODD = dataclasses.replace(DATASET, preset='resnet')\n",
                   {"dagc.datasets": {"theirs": "{m}:ODD"}}, ["'theirs'", "preset must be one of"]),
    "kind not a pair": ("", {"dagc.kinds": {"heat": "{m}:HEAT"}}, ["'heat'", "(TaskKind, KindTraining) pair"]),
    "kind with an unknown head": (
        "import dataclasses\nKIND = (dataclasses.replace(HEAT, head='fpn'), KIND[1])\n", None,
        ["'heat'", "head must be one of ['aspp', 'linear']", "'fpn'"]),
    "dense kind with the linear head": (
        "import dataclasses\nKIND = (dataclasses.replace(HEAT, head='linear'), KIND[1])\n", None,
        ["'heat'", "needs the aspp head"]),
    "kind missing its meter": (
        "import dataclasses\nKIND = (HEAT, dataclasses.replace(KIND[1], meter=None))\n", None,
        ["'heat'", "meter must be a subclass"]),
    "kind clashes with built-in": (
        "DEPTH = (TaskKind('depth', True, False, 1, 'aspp'), KIND[1])\n",
        {"dagc.kinds": {"depth": "{m}:DEPTH"}}, ["'depth'", "clashes with a built-in kind"]),
    "loader returns a dict": ("def load_dict(opts):\n    return {'x': 1}\nimport dataclasses\n"
                              "DATASET = dataclasses.replace(DATASET, load=load_dict)\n", None,
                              ["dataset 'theirs'", "'theirs'", "returned dict, not a dagc.trainer.data.MultiTaskData"]),
    "loader returns wrong target shape": (
        "_old = load\ndef load_bad(opts):\n    d = _old(opts)\n    d.train.targets['vec'] = d.train.targets['vec'][:, :2]\n"
        "    return d\nimport dataclasses\nDATASET = dataclasses.replace(DATASET, load=load_bad)\n", None,
        ["dataset 'theirs'", "targets of task 'vec' (regression)", "(16, 3)"]),
    "loader returns int inputs": (
        "_old = load\ndef load_bad(opts):\n    d = _old(opts)\n    return MultiTaskData(d.name, 3, d.input_size, True, d.tasks,"
        " Split(d.train.inputs.astype('int64'), d.train.targets), d.test)\nimport dataclasses\n"
        "DATASET = dataclasses.replace(DATASET, load=load_bad)\n", None,
        ["dataset 'theirs'", "inputs of task 'heat' must be float32"]),
    "loader returns other tasks": (
        "_old = load\ndef load_bad(opts):\n    d = _old(opts)\n    return MultiTaskData(d.name, 3, d.input_size, True,"
        " d.tasks[::-1], d.train, d.test)\nimport dataclasses\nDATASET = dataclasses.replace(DATASET, load=load_bad)\n",
        None, ["dataset 'theirs'", "were asked for"]),
    "loader raises": ("def load_bad(opts):\n    raise KeyError('labels.csv')\nimport dataclasses\n"
                      "DATASET = dataclasses.replace(DATASET, load=load_bad)\n", None,
                      ["dataset 'theirs'", "loader raised KeyError"]),
    "task of an unknown kind": ("TASKS['heat'] = TaskSpec('heat', 'heatwave')\n", None,
                                ["dataset 'theirs'", "unknown kind 'heatwave'"]),
}


@pytest.mark.parametrize("case", BAD)
def test_a_broken_plugin_is_one_line_exit_2_and_nothing_written(case, install, tmp_path, capsys):
    extra, entry_points, words = BAD[case]
    install(extra, entry_points)
    run = tmp_path / "run"
    code, out, err = _run(["train", "--out", str(run), "--dataset", "theirs", *FAST], capsys)
    assert code == 2 and not run.exists(), (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dagc: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
