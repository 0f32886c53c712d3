"""`dagc serve`: a compiled artifact on a real Triton Inference Server, on this machine.

The server is the ``tritonserver`` binary (Triton 2.51) that the ``nvidia-pytriton`` wheel ships
under ``pytriton/tritonserver/`` with Triton's Python backend and its stubs for Python 3.8-3.13;
PyTriton's own Python API is not used. That build has no onnxruntime backend, so the repository
served is the Python-backend one (`dagc.tools.triton`, ``backend="python"``): the same models,
names, batching, ensembles and routes as the onnxruntime repository that the NGC container serves.

`TritonServer.start` exports that repository and lays out a backend directory (the Python
backend plus the stub of this Python's version) in a temporary directory of its own, checks that
the ports are free, starts the server in its own process group (with that directory as its
``TMPDIR``; `dagc.tools.children`: a watcher ends the group and removes the directory if dagc is
killed) and waits until it reports ready;
`TritonServer.stop` terminates the group, kills it after a timeout and removes the temporary
directory and any shared-memory region the server left (their names carry that directory's).
Nothing else is written.

The server's environment makes the stub embed this very interpreter, so that its model.py files
import the dagc and ONNX Runtime installed here: this interpreter's libdir first on
``LD_LIBRARY_PATH`` (the stub links ``libpython3.X.so``) and its ``bin`` first on ``PATH`` (the
embedded Python finds its prefix, and a virtual environment's site-packages, from the
``python3`` there).
"""

from __future__ import annotations

import errno
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dagc.errors import ServeError
from dagc.outputs import check_not_input, check_writable_file
from dagc.tools.children import end_group, release, start_group
from dagc.tools.triton import TritonConfig, export_triton
from dagc.writing import write_failed

__all__ = ["ServeConfig", "ServerFiles", "TritonServer", "find_server", "describe", "serve"]

INSTALL = ("install it with: pip install -e '.[serve]' && pip install --no-deps 'nvidia-pytriton>=0.7,<0.8' "
           "(README, Serving with Triton)")
# Triton's glog error lines ("E1201 23:10:09.69 ...] ...") that a machine without a GPU always
# prints: not the reason for a failure
_ERROR_LINE = re.compile(r"^E\d{4} ")
_NOISE = ("CudaDriverHelper", "CUDA driver", "unable to create stream", "NVML", "DCGM")


@dataclass(frozen=True)
class ServerFiles:
    """Where the parts of the server are: the binary, the directory of its shared libraries, the
    Python backend's directory and the stub for this Python."""

    binary: Path
    libs: Path
    python_backend: Path
    stub: Path


def find_server(root: str | os.PathLike | None = None) -> ServerFiles:
    """The server files under ``root`` (nvidia-pytriton's ``pytriton/tritonserver`` directory;
    default: the installed package's, found without importing it). Raises ServeError naming
    what is missing and how to install it."""
    if root is None:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise ServeError(f"dagc serve needs Triton's server binary (the nvidia-pytriton package); {INSTALL}")
        root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    root = Path(root)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    files = ServerFiles(binary=root / "bin" / "tritonserver", libs=root.parent.parent / "nvidia_pytriton.libs",
                        python_backend=root / "backends" / "python",
                        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub")
    for what, path in (("server binary", files.binary), ("server libraries", files.libs),
                       ("Python backend", files.python_backend / "libtriton_python.so")):
        if not path.exists():
            raise ServeError(f"dagc serve needs Triton's {what}, and {path} does not exist; {INSTALL}")
    if not files.stub.exists():
        raise ServeError(f"Triton's Python backend has no stub for Python {version} ({files.stub} does not exist); "
                         "run dagc with Python 3.8 to 3.13")
    return files


@dataclass(frozen=True)
class ServeConfig:
    """How to serve.

    host: the IPv4 address every endpoint binds to; 127.0.0.1 (default) serves this machine
        only, 0.0.0.0 all interfaces.
    http_port, grpc_port, metrics_port: the endpoints' ports; 0 picks a free one; metrics_port
        None: no metrics endpoint.
    startup_timeout_s: how long to wait for the server to report ready.
    stop_timeout_s: how long in-flight requests may take at shutdown before the server is killed.
    triton: the repository's `TritonConfig` (its backend is always "python").
    server_log: a file the server's own log is appended to (default: none kept).
    """

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int | None = 8002
    startup_timeout_s: float = 120.0
    stop_timeout_s: float = 30.0
    triton: TritonConfig = field(default_factory=lambda: TritonConfig(backend="python"))
    server_log: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        try:  # what Triton's --http-address and --grpc-address take (gRPC would misread an IPv6 one)
            ipaddress.IPv4Address(self.host)
        except (ipaddress.AddressValueError, TypeError):
            raise ServeError(f"--host takes an IPv4 address such as 127.0.0.1 (this machine only) or 0.0.0.0 "
                             f"(all interfaces), got {self.host!r}") from None
        _check_host(self.host)
        for name in ("http_port", "grpc_port", "metrics_port"):
            v = getattr(self, name)
            if v is None and name == "metrics_port":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
                raise ServeError(f"--{name.replace('_', '-')} must be a port number from 0 to 65535, got {v!r}")
        ports = [p for p in (self.http_port, self.grpc_port, self.metrics_port) if p]
        if len(set(ports)) < len(ports):
            raise ServeError(f"--http-port, --grpc-port and --metrics-port must differ, got {ports}")
        # the stop timeout becomes Triton's --exit-timeout-secs, an int32
        for name in ("startup_timeout_s", "stop_timeout_s"):
            if not 0 < getattr(self, name) <= 2**31 - 1:
                raise ServeError(f"ServeConfig.{name} must be positive and at most 2147483647 s, got "
                                 f"{getattr(self, name)!r}")
        if self.server_log is not None:  # before the server starts: its log would be lost, or a traceback
            check_writable_file(self.server_log, option="--server-log", error=ServeError)
        if not isinstance(self.triton, TritonConfig):
            raise ServeError(f"ServeConfig.triton must be a TritonConfig, got {type(self.triton).__name__}")
        if self.triton.backend != "python":
            object.__setattr__(self, "triton", replace(self.triton, backend="python"))


def _not_here(host: str, e: OSError) -> ServeError:
    return ServeError(f"--host {host!r} is not an address of this machine ({e.strerror}); give one of its "
                      "addresses, 127.0.0.1 (this machine only) or 0.0.0.0 (all interfaces)")


def _check_host(host: str) -> None:
    """Refuse an IPv4 address that no interface of this machine has (binding any port there fails
    whatever the port; the port checks would otherwise be blamed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise _not_here(host, e) from None


def _claim_port(host: str, port: int, what: str) -> int:
    """``port`` if nothing listens on it at ``host`` (a free one for 0); ``what``: http, grpc or
    metrics, for the message. The check and the
    server's bind are not atomic; the server's own failure to bind is reported too."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ServeError(f"--host {host!r} is not an address of this machine ({e.strerror})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is free
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise _not_here(host, e) from None
            if port == 0:
                raise ServeError(f"--host {host!r} cannot be bound here ({e.strerror})") from None
            raise ServeError(f"the {what} port {port} on {host} is taken ({e.strerror}); choose another with "
                             f"--{what}-port (0 picks a free one)") from None
        return s.getsockname()[1]


class TritonServer:
    """A Triton server serving one artifact; a context manager (``with TritonServer(art) as s:``).

    Takes the artifact directory, a `ServeConfig` and the server files' directory (`find_server`).
    After `start`: ``process`` (the server, leader of its own process group), ``ports`` (http,
    grpc, metrics -> the port in use), ``routing`` (what `export_triton` returned) and
    ``version``.
    """

    def __init__(self, artifact: str | os.PathLike, config: ServeConfig | None = None, *,
                 server_dir: str | os.PathLike | None = None) -> None:
        self.artifact = Path(artifact)
        self.config = ServeConfig() if config is None else config
        self.server_dir = server_dir
        self.process: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.routing: dict[str, Any] = {}
        self.version = ""
        self._tmp: Path | None = None
        self._log = None
        self._watcher: subprocess.Popen | None = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def connect_host(self) -> str:
        """The address clients on this machine use (the host itself unless it is a wildcard)."""
        return "127.0.0.1" if self.config.host == "0.0.0.0" else self.config.host

    def url(self, endpoint: str = "http") -> str:
        """``host:port`` of an endpoint (http, grpc or metrics), as tritonclient takes it."""
        return f"{self.connect_host}:{self.ports[endpoint]}"

    def start(self) -> TritonServer:
        """Export, lay out and start the server; returns self once it is ready. Raises ServeError
        (no server binary, a port taken, the server failed or was not ready in time),
        ArtifactError / ConfigError from the export, ServeError for a ``server_log`` inside the
        artifact or one that cannot be created; on any error nothing is left running or written."""
        if self.process is not None:
            raise ServeError("this server was already started")
        cfg = self.config
        if cfg.server_log is not None:  # appending there would damage the artifact served
            check_not_input(cfg.server_log, [self.artifact], option="--server-log", error=ServeError, what="artifact")
        files = find_server(self.server_dir)
        wanted = {"http": cfg.http_port, "grpc": cfg.grpc_port, "metrics": cfg.metrics_port}
        self.ports = {k: _claim_port(cfg.host, p, k) for k, p in wanted.items() if p is not None}
        self._tmp = Path(tempfile.mkdtemp(prefix="dagc-serve-"))
        try:
            self.routing = export_triton(self.artifact, self._tmp / "repository", cfg.triton)
            backend = self._tmp / "backends" / "python"
            shutil.copytree(files.python_backend, backend, ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(files.stub, backend / files.stub.name)
            self._log = _open_log(cfg.server_log, self._tmp)
            (self._tmp / "tmp").mkdir()
            env = _environment(files, self._tmp / "tmp")
            self.process, self._watcher = start_group(self._command(files), env=env, stdout=self._log,
                                                      tmp=self._tmp, shm_prefix=self._shm_prefix())
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _command(self, files: ServerFiles) -> list[str]:
        cfg, host = self.config, self.config.host
        cmd = [str(files.binary), f"--model-repository={self._tmp / 'repository'}",
               f"--backend-directory={self._tmp / 'backends'}", "--disable-auto-complete-config",
               f"--backend-config=python,shm-region-prefix-name={self._shm_prefix()}",
               f"--exit-timeout-secs={max(1, int(cfg.stop_timeout_s))}",
               f"--http-address={host}", f"--http-port={self.ports['http']}",
               f"--grpc-address={host}", f"--grpc-port={self.ports['grpc']}"]
        if "metrics" in self.ports:
            return cmd + [f"--metrics-address={host}", f"--metrics-port={self.ports['metrics']}"]
        return cmd + ["--allow-metrics=false"]

    def _shm_prefix(self) -> str:
        """The names of this server's Python-backend shared-memory regions start with this."""
        return f"{self._tmp.name}_shm"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        base = f"http://{self.url('http')}"
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServeError(f"tritonserver exited with code {code} while starting: {self.last_error()}")
            try:
                with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        with urllib.request.urlopen(f"{base}/v2", timeout=5) as meta:
                            self.version = json.load(meta).get("version", "")
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or models still loading (400)
            if time.monotonic() > deadline:
                raise ServeError(f"tritonserver was not ready after {self.config.startup_timeout_s:g} s: "
                                 f"{self.last_error()}")
            time.sleep(0.1)

    def last_error(self) -> str:
        """The server log's last error line that is not a no-GPU warning, else its last line."""
        if self._log is None:
            return "no log"
        self._log.flush()
        lines = [ln.strip() for ln in Path(self._log.name).read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if _ERROR_LINE.match(ln) and not any(n in ln for n in _NOISE)]
        return (errors or lines or ["the log is empty"])[-1]

    def stop(self) -> None:
        """Stop the server (SIGTERM to its process group; SIGKILL after ``stop_timeout_s`` plus a
        grace period), then remove the temporary directory. Safe to call more than once."""
        if self.process is not None:
            end_group(self.process, self.config.stop_timeout_s + 5)
            if self._tmp is not None:  # a server stopped while loading leaves its regions in /dev/shm
                for region in Path("/dev/shm").glob(f"{self._shm_prefix()}*"):
                    region.unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        if self._watcher is not None:  # after the group and the files: it has nothing left to do
            release(self._watcher)
            self._watcher = None


def _open_log(path: Path | None, tmp: Path):
    """The server's log file, opened for appending (``tmp/server.log`` when ``path`` is None); its
    directory is created when missing. Raises ServeError naming the path (a log in the server's
    temporary repository, or one the system cannot create)."""
    if path is None:
        return open(tmp / "server.log", "ab")
    check_not_input(path, [tmp], option="--server-log", error=ServeError, what="server's temporary repository")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "ab")
    except OSError as e:
        raise write_failed(path, e, ServeError, then="start dagc serve again") from None


def _environment(files: ServerFiles, tmp: Path) -> dict[str, str]:
    """The server's environment (see the module docstring); its temporary files go to ``tmp``,
    which `TritonServer.stop` removes."""
    env = {**os.environ, "TMPDIR": str(tmp)}
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(files.libs), env.get("LD_LIBRARY_PATH")) if p)
    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH")) if p)
    return env


def describe(server: TritonServer) -> str:
    """The endpoints and the routes (task subset -> the model that serves it), for people."""
    ports, host = server.ports, server.config.host
    lines = [f"Triton {server.version} serving {server.artifact} ({len(server.routing['models'])} models, "
             f"Python backend)", f"  HTTP     http://{host}:{ports['http']}  (POST /v2/models/<model>/infer)",
             f"  gRPC     {host}:{ports['grpc']}"]
    if "metrics" in ports:
        lines.append(f"  metrics  http://{host}:{ports['metrics']}/metrics")
    lines.append(f"  server   pid {server.process.pid} (process group {server.process.pid})")
    lines.append("routes (tasks -> model):")
    models = server.routing["models"]
    for key, route in server.routing["routes"]["onnx"].items():
        if "model" in route:
            steps = models[route["model"]].get("steps")
            how = f"{route['model']}" + (f"  (ensemble of {', '.join(steps)})" if steps else "")
        else:
            how = f"call {', '.join(route['models'])} one by one"
        lines.append(f"  {key:<24}{how}")
    return "\n".join(lines)


def serve(artifact: str | os.PathLike, config: ServeConfig, echo: Callable[[str], None] = print) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly. Raises ServeError as `TritonServer.start`
    does, or when the server exits on its own."""
    # SIGTERM stops as Ctrl-C does; SIGINT too when the parent ignored it (a shell's background job)
    previous = [signal.signal(s, signal.default_int_handler) for s in (signal.SIGINT, signal.SIGTERM)]
    server = TritonServer(artifact, config)
    try:
        server.start()
        echo(describe(server))
        echo("Ctrl-C or SIGTERM stops the server.")
        while server.process.poll() is None:
            time.sleep(0.5)
        raise ServeError(f"tritonserver exited with code {server.process.returncode}: {server.last_error()}")
    except KeyboardInterrupt:
        echo("stopping")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        try:
            server.stop()
        finally:
            for sig, handler in zip((signal.SIGINT, signal.SIGTERM), previous):
                signal.signal(sig, handler)
