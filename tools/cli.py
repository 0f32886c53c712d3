"""The `dagc` command: a thin layer over the Python API.

Every error a user can cause ends with one line on stderr, ``dagc: error: <what> ...; <what to do>``,
and exit code 2; never a traceback.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from dagc.errors import DagcError
from dagc.precision_table import REFERENCE
from dagc.tools.cli_train import int_list, recalibrate, train
from dagc.writing import fault_line


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dagc")
def cli() -> None:
    """dagc: search a multi-task central network and compile it into per-task inference models."""


cli.add_command(train)
cli.add_command(recalibrate)


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--target", default="onnx", show_default=True, help="onnx, tensorrt (needs a CUDA GPU) or aoti (adds AOTInductor .pt2 packages for C++; "
              "needs a C++ compiler).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Artifact directory to write.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--fp16", is_flag=True, help="Alias of the target files of --precision fp32,fp16 (TensorRT fp16 plans; aoti "
              "with --device cuda: fp16 packages beside the fp32 ones), without its checked fp16 ONNX models.")
@click.option("--bf16", is_flag=True, help="Alias of the target files of --precision fp32,bf16 (aoti with --device cuda: "
              "bf16 packages beside the fp32 ones), without its OpenVINO bf16 check.")
@click.option("--device", default=None, help="aoti: compile the packages for cpu (default) or cuda.")
@click.option("--batch", "batch", default="1,8,32", show_default=True,
              help="TensorRT: batch sizes the optimisation profile covers.")
@click.option("--precision", "precision", default=REFERENCE, show_default=True,
              help="Comma-separated precisions: fp32 (always built, the reference), int8 (QDQ ONNX), bf16 "
                   "(OpenVINO), fp16 (ONNX for TensorRT/CUDA); each checked on the tasks' held-out metrics. The "
                   "target's own files follow: fp16 makes TensorRT fp16 plans, and with aoti --device cuda fp16 / "
                   "bf16 add fp16 / bf16 packages.")
@click.option("--calibration-batches", "calibration_batches", type=int, default=None,
              help="int8: batches of the run's training data that calibrate the activation ranges (default 8).")
@click.option("--calibration-seed", "calibration_seed", type=int, default=None,
              help="int8: seed that draws the calibration batches (default 0).")
@click.option("--calibration", "calibration", type=str, default=None,
              help="int8: how activation ranges are calibrated: minmax (default), entropy or percentile.")
@click.option("--max-metric-drop", "max_metric_drop", type=float, default=None,
              help="Refuse a precision whose primary metric drops by more than this (relative) on a task (default 0.01).")
@click.option("--data-root", "data_root", type=str, default=None,
              help="Directory of the run's on-disk dataset (for calibration and the accuracy check).")
def compile(checkpoint, target, out, force, fp16, bf16, device, batch, **precision_options) -> None:
    """Compile a reduced checkpoint into verified models in an artifact directory."""
    from dagc.compiler.compile import CompileOptions, compile_summary

    options = CompileOptions(target=target, force=force, fp16=fp16, bf16=bf16, device=device,
                             batches=tuple(int_list("--batch", batch)), precisions=precision_options.pop("precision"),
                             **precision_options)
    manifest, text = compile_summary(checkpoint, out, options)
    click.echo(text)
    click.echo(f"\nwrote {out} (compiled and verified in {manifest.compile_seconds:.1f} s)")


@cli.command()
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option("--network", type=click.Path(dir_okay=False, path_type=Path), help="A network file instead of PATH.")
@click.option("--tasks", help="With --network: comma-separated [NAME=]KIND[:CLASSES] (default: one depth task).")
@click.option("--input-size", "input_sizes", multiple=True, help="With --network: HxW (repeatable; default: the file's).")
@click.option("--in-channels", "in_channels", type=int, default=3, show_default=True, help="With --network.")
@click.option("--costs", "costs", default=None,
              help="Show the cost table of the checkpoint's network on a target: flops, onnxruntime-cpu or "
                   "openvino-cpu (measured and cached on a miss).")
@click.option("--cost-batch", "cost_batch", type=int, default=None, help="With --costs: samples per call (default: the run's, else 1).")
@click.option("--cost-threads", "cost_threads", type=int, default=None, help="With --costs: intra-op threads (default: the run's, else 1).")
@click.option("--remeasure", is_flag=True, help="With --costs: measure the table again and replace the cached one.")
def inspect(path, network, tasks, input_sizes, in_channels, costs, cost_batch, cost_threads, remeasure) -> None:
    """Show per-task topology, sharing and FLOPs of a checkpoint or an artifact directory; with
    --network, a network file's states, edges, parameters and FLOPs before any training; with
    --costs, the cost table of a checkpoint's network on a target."""
    from dagc.compiler.compile import inspect_summary, summary
    from dagc.modelcheck import verify_artifact
    from dagc.tools.costs import inspect_costs
    from dagc.tools.evaluate import checkpoint_stages
    from dagc.tools.network_info import describe_network, parse_tasks

    if (path is None) == (network is None):
        raise DagcError("give a checkpoint or artifact PATH, or --network FILE (not both)")
    if costs is None and (cost_batch is not None or cost_threads is not None or remeasure):
        raise DagcError("--cost-batch, --cost-threads and --remeasure say how --costs TARGET is measured; add --costs")
    if costs is not None:
        if path is None:
            raise DagcError("--costs prices a checkpoint's network; give the checkpoint as PATH")
        click.echo(inspect_costs(path, costs, cost_batch, cost_threads, remeasure))
    elif network is not None:
        sizes = [int_list("--input-size", s.lower().replace("x", ",")) for s in input_sizes]
        click.echo(describe_network(network, parse_tasks(tasks), sizes, in_channels))
    elif tasks is not None or input_sizes or in_channels != 3:
        raise DagcError("--tasks, --input-size and --in-channels describe a --network file; drop them for PATH")
    else:
        click.echo(summary(verify_artifact(path)) if path.is_dir() else inspect_summary(path) + checkpoint_stages(path))


@cli.group()
def export() -> None:
    """Turn a compiled artifact into another deployment format."""


@export.command("triton")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Model repository to write.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--name", default="dagc", show_default=True, help="Prefix of the Triton model names.")
@click.option("--max-batch", "max_batch", type=int, default=None,
              help="max_batch_size of the ONNX models (default: the TensorRT profile's largest batch, else 32).")
@click.option("--instances", type=int, default=1, show_default=True, help="Model instances per device.")
@click.option("--max-queue-delay-us", "delay", type=int, default=100, show_default=True,
              help="Dynamic batcher: longest wait to fill a batch, in microseconds.")
@click.option("--no-ensembles", is_flag=True, help="No ensemble models for task subsets.")
@click.option("--backend", default="onnxruntime", show_default=True,
              help="onnxruntime (onnxruntime_onnx and tensorrt_plan models, for the NGC container) or python "
                   "(Triton's Python backend running the ONNX models with ONNX Runtime; what dagc serve runs).")
@click.option("--threads", type=int, default=0, show_default=True,
              help="--backend python: ONNX Runtime intra-op threads per model instance (0: one per core).")
def export_triton(artifact, out, force, name, max_batch, instances, delay, no_ensembles, backend, threads) -> None:
    """Write a Triton Inference Server model repository for ARTIFACT (ONNX models, TensorRT plans,
    ensembles for task subsets, routing.json)."""
    from dagc.tools.triton import TritonConfig
    from dagc.tools.triton import export_triton as run_export

    config = TritonConfig(name=name, max_batch_size=max_batch, instances=instances, max_queue_delay_us=delay,
                          ensembles=not no_ensembles, backend=backend, intra_op_threads=threads)
    routing = run_export(artifact, out, config, force=force)
    for model, info in sorted(routing["models"].items()):
        click.echo(f"{model:<32}{info['platform']:<18}{','.join(info['tasks'])}")
    click.echo(f"\nwrote {out} ({len(routing['models'])} models; task subset -> model in {out / 'routing.json'})")


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind every endpoint to; 0.0.0.0 serves all interfaces.")
@click.option("--http-port", "http_port", type=int, default=8000, show_default=True, help="0 picks a free port.")
@click.option("--grpc-port", "grpc_port", type=int, default=8001, show_default=True, help="0 picks a free port.")
@click.option("--metrics-port", "metrics_port", type=int, default=8002, show_default=True,
              help="Prometheus metrics; 0 picks a free port.")
@click.option("--no-metrics", is_flag=True, help="No metrics endpoint.")
@click.option("--name", default="dagc", show_default=True, help="Prefix of the Triton model names.")
@click.option("--max-batch", "max_batch", type=int, default=None, help="max_batch_size of the models (default 32).")
@click.option("--instances", type=int, default=1, show_default=True, help="Model instances (processes) per model.")
@click.option("--max-queue-delay-us", "delay", type=int, default=100, show_default=True,
              help="Dynamic batcher: longest wait to fill a batch, in microseconds.")
@click.option("--threads", type=int, default=0, show_default=True,
              help="ONNX Runtime intra-op threads per model instance (0: one per core).")
@click.option("--server-log", "server_log", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append the server's own log to this file.")
def serve(artifact, host, http_port, grpc_port, metrics_port, no_metrics, name, max_batch, instances, delay,
          threads, server_log) -> None:
    """Serve ARTIFACT on a Triton Inference Server here (Python backend; needs the serve extra)
    until Ctrl-C or SIGTERM. Prints the endpoints and which model serves each task subset."""
    from dagc.tools.serve import ServeConfig
    from dagc.tools.serve import serve as run_serve
    from dagc.tools.triton import TritonConfig

    triton = TritonConfig(name=name, max_batch_size=max_batch, instances=instances, max_queue_delay_us=delay,
                          backend="python", intra_op_threads=threads)
    config = ServeConfig(host=host, http_port=http_port, grpc_port=grpc_port,
                         metrics_port=None if no_metrics else metrics_port, triton=triton, server_log=server_log)
    run_serve(artifact, config, echo=click.echo)


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--tasks", default=None, help="Comma-separated tasks (default: all).")
@click.option("--backend", default="auto", show_default=True,
              help="auto, onnxruntime, tensorrt, torch or openvino.")
@click.option("--precision", default=REFERENCE, show_default=True,
              help="Models' precision: fp32, int8, fp16 (files the artifact holds) or bf16 (backend openvino).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the outputs (.npy, pictures, top-k JSON).")
def run(artifact, images, tasks, backend, precision, out) -> None:
    """Run a compiled artifact on PNG/JPEG/.npy images and write each task's output."""
    from dagc.runtime.images import NoPreprocessingWarning, run_images

    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NoPreprocessingWarning)
        written = run_images(artifact, list(images), out, tasks=task_list, backend=backend,
                             precision=precision)
    for w in caught:
        if issubclass(w.category, NoPreprocessingWarning):
            click.echo(f"dagc: warning: {w.message}", err=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    click.echo(f"wrote {len(written)} files to {out}")


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="The checkpoint the artifact was compiled from (for the supernet baselines).")
@click.option("--batch", "batch", default="1,8,32", show_default=True)
@click.option("--backend", default="auto", show_default=True, help="auto, onnxruntime, tensorrt or torch.")
@click.option("--threads", type=int, default=None, help="Intra-op threads for PyTorch and ONNX Runtime.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the results here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write latency against batch size here (PNG).")
@click.option("--precision", "precision", default=None,
              help="Comma-separated precisions to time beside fp32 (int8, fp16, bf16; OpenVINO f32 counts as fp32; "
                   "default: every one the artifact has).")
def bench(artifact, checkpoint, batch, backend, threads, json_path, plot_path, precision) -> None:
    """Latency, throughput and FLOPs of the compiled models against the supernets, side by side."""
    from dagc.errors import BenchError
    from dagc.outputs import check_not_input, check_writable_file
    from dagc.tools import bench as runtime_bench
    from dagc.tools.costs import bench_budget, bench_budget_lines

    if threads is not None and threads < 1:
        raise DagcError(f"--threads must be a positive integer, got {threads}")
    for option, path in (("--json", json_path), ("--plot", plot_path)):
        if path is not None:  # before the benchmark runs: its results must not be lost
            check_writable_file(path, option=option, error=BenchError)
            check_not_input(path, [artifact, checkpoint], option=option, error=BenchError)
    precisions = None if precision is None else [p.strip() for p in precision.split(",") if p.strip()]
    result = runtime_bench.benchmark(artifact, checkpoint, batches=int_list("--batch", batch), backend=backend,
                                     threads=threads, precisions=precisions)
    click.echo(runtime_bench.format_table(result))
    result["budget"] = bench_budget(result, checkpoint)  # the compiled models against the run's budget
    for line in bench_budget_lines(result["budget"]):
        click.echo(line)
    if json_path is not None:
        runtime_bench.write_json(result, json_path)
    if plot_path is not None:
        runtime_bench.plot(result, plot_path)


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--against", "against", type=click.Path(path_type=Path), default=None,
              help="A baseline run (e.g. dagc train --baseline single-task) for Δ per task and Δ_T.")
def evaluate(run_dir, against) -> None:
    """Print a finished run's paper-style table: metrics, Δ against a baseline, parameters."""
    from dagc.tools.evaluate import format_table, load_run

    run = load_run(run_dir)
    click.echo(format_table(run, load_run(against) if against is not None else None))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning user errors into one line and exit code 2."""
    try:
        cli.main(args=argv, prog_name="dagc", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("dagc: aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        hint = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
        click.echo(f"dagc: error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except (DagcError, OSError) as e:  # an OSError that got here unconverted: the machine's, one line too
        click.echo(f"dagc: error: {fault_line(e)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("dagc: interrupted; continue with --resume RUN_DIR", err=True)
        sys.exit(130)
    sys.exit(0)


if __name__ == "__main__":
    main()
