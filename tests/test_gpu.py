"""GPU checks: run on a machine with CUDA (skipped elsewhere), never faked."""

import copy

import pytest
import torch

from dagc.spec import TaskSpec, preset
from dagc.trainer.network import CentralNetwork
from dagc.trainer.train import TrainConfig, train

pytestmark = pytest.mark.gpu


def test_stacked_equals_one_by_one_on_cuda():
    spec = preset("tiny", [TaskSpec("s", "segmentation", 4), TaskSpec("d", "depth")], input_size=(16, 16))
    torch.manual_seed(0)
    a = CentralNetwork(spec).cuda().double()
    with torch.no_grad():
        for p in a.arch_parameters():
            p.normal_()
    b = copy.deepcopy(a)
    x = torch.randn(3, 3, 16, 16, device="cuda", dtype=torch.double)
    out_a = a(x)
    sum(v.pow(2).mean() for v in out_a.values()).backward()
    for t in spec.task_names:
        y = b(x, tasks=[t])[t]
        torch.testing.assert_close(y, out_a[t])
        y.pow(2).mean().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_short_training_run_on_cuda(tmp_path):
    cfg = TrainConfig(warmup_iters=3, search_iters=3, finetune_iters=3, batch_size=4, n_train=16, n_test=8,
                      device="cuda")
    metrics = train(cfg, tmp_path / "run", progress=False)
    assert set(metrics["final"]) == {"segmentation", "depth", "normal", "edge"}


def test_tensorrt_plans_are_built_and_verified(tmp_path):
    """Builds fp32 plans for a trained checkpoint and checks them against ONNX Runtime (the compile
    itself refuses plans that disagree)."""
    pytest.importorskip("tensorrt")
    from dagc.compiler.compile import compile_checkpoint

    cfg = TrainConfig(warmup_iters=3, search_iters=3, finetune_iters=3, batch_size=4, n_train=16, n_test=8)
    train(cfg, tmp_path / "run", progress=False)
    manifest = compile_checkpoint(tmp_path / "run" / "checkpoint.safetensors", tmp_path / "art",
                                  target="tensorrt", batches=(1, 4, 8))
    plans = [n for n, m in manifest["models"].items() if m["format"] == "tensorrt"]
    assert len(plans) == 5
    assert all(manifest["models"][p]["verified_max_rel_error"] <= 1e-2 for p in plans)
