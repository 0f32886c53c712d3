"""Random reduced supernets for compiler tests: random weights and affine batch-norm parameters,
random closed masks with a path for every task, and each task's batch-norm statistics re-estimated
on random inputs (so batch norm is not the identity, the statistics differ per task, and they are
equal where the tasks' upstream is, as after training)."""

import numpy as np
import torch

from dagc.compiler.ir import build_graph
from dagc.trainer.batchnorm import task_batchnorms
from dagc.trainer.network import CentralNetwork, network_tensors
from dagc.trainer.recalibrate import reestimate_statistics
from dagc.trainer.topology import close_masks, flow_band, is_connected


def random_masks(spec, rng, density=0.5, same=False):
    band = flow_band(spec.n_states, spec.flow_constant)
    out = [[], [], []]
    first = None
    for _ in spec.tasks:
        while first is None or not same:
            g = band * (rng.random(band.shape) < density)
            a = (rng.random(spec.n_states) < 0.4).astype(np.int64)
            b = (rng.random(spec.n_states) < 0.4).astype(np.int64)
            g, a, b = close_masks(g, a, b)
            if is_connected(g, a, b):
                first = (g, a, b)
                break
        for lst, m in zip(out, first):
            lst.append(torch.from_numpy(m))
    return [torch.stack(lst) for lst in out]


def random_network(spec, seed):
    """An unreduced network of ``spec`` with random weights and affine batch-norm parameters."""
    torch.manual_seed(seed)
    net = CentralNetwork(spec)
    with torch.no_grad():
        for m in task_batchnorms(net):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.2)
    return net


def random_reduced_net(spec, seed, density=0.5, same=False):
    net = random_network(spec, seed)
    net.set_masks(*random_masks(spec, np.random.default_rng(seed), density, same))
    gen = torch.Generator().manual_seed(seed)
    lead = () if spec.shared_input else (spec.n_tasks,)
    reestimate_statistics(net, [torch.randn(*lead, 4, spec.in_channels, *spec.input_size, generator=gen) * 1.5 + 0.3
                                for _ in range(2)])
    return net.eval()


def random_graph(spec, seed, density=0.5, same=False):
    """The unoptimised IR (`build_graph`) of `random_reduced_net`; returns (net, graph)."""
    net = random_reduced_net(spec, seed, density, same)
    return net, build_graph(spec, network_tensors(net))


def compiled_artifact(root, spec, seed, **compile_kw):
    """Compile a random reduced network of ``spec`` into ``root/art`` (checkpoint in
    ``root/c.safetensors``); returns the artifact directory."""
    from dagc.checkpoint import save_checkpoint
    from dagc.compiler.compile import compile_checkpoint

    ckpt = root / "c.safetensors"
    save_checkpoint(ckpt, network_tensors(random_reduced_net(spec, seed)), spec, "finetune")
    compile_checkpoint(ckpt, root / "art", **compile_kw)
    return root / "art"
