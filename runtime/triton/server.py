"""Run the `tritonserver` of the `nvidia-pytriton` wheel (Triton 2.51, Python backend) on a model repository.

For CPU machines and tests: no container; 127.0.0.1 unless told another address. What it takes: the wheel's backend
directory copied with the Python backend stub of this interpreter's version put in `backends/python/`; `LD_LIBRARY_PATH`
naming the wheel's `nvidia_pytriton.libs` and the directory of this interpreter's libpython; this interpreter's
`bin/` first on PATH (the stub runs the model with the Python it finds there, so a venv's packages are seen).
The server is stopped by its PID.

    python -m mirasol.runtime.triton.server REPOSITORY [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import shlex
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
from collections.abc import Sequence
from pathlib import Path

from ..cli.commandline import HelpFormatter, bounded
from ..errors import BackendError, MirasolError

PORT = bounded(int, 0, 65535)  # 0: a free one

HOST = "127.0.0.1"
CONTROL_MODES = ("none", "poll", "explicit")


def wheel_paths() -> tuple[Path, Path, Path]:
    """The wheel's tritonserver directory, its stub for this Python, and its bundled libraries."""
    try:
        import pytriton
    except ImportError:
        raise BackendError("the nvidia-pytriton wheel is not installed (pip install 'mirasol-edge[triton]')") from None
    root = Path(pytriton.__file__).parent
    server = root / "tritonserver"
    stub = server / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / \
        "triton_python_backend_stub"
    return server, stub, root.parent / "nvidia_pytriton.libs"


def availability() -> tuple[bool, str]:
    """Whether the wheel's server can run here, and why not."""
    if platform.system() != "Linux":
        return False, f"the nvidia-pytriton wheel runs on Linux only, this is {platform.system()}"
    try:
        server, stub, libs = wheel_paths()
    except BackendError as missing:
        return False, str(missing)
    for path in (server / "bin" / "tritonserver", stub, libs):
        if not path.exists():
            return False, f"the nvidia-pytriton wheel has no {path} (Python {platform.python_version()})"
    return True, f"tritonserver of nvidia-pytriton at {server}"


def _end_with_parent() -> None:
    """In the server's process, before it starts: get SIGTERM when the thread that started it ends (Linux
    PR_SET_PDEATHSIG), so a killed test run or client leaves no server behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def free_port(address: str = HOST) -> int:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class LocalServer:
    """tritonserver serving `repository`; `start()` waits until it is ready, `stop()` ends it by PID.

    `address`: where its endpoints listen (0.0.0.0: every interface); a port 0: a free one; `metrics_port` None: no
    metrics endpoint. `model_control_mode` "none" (every model, loaded once), "poll" (the repository is watched) or
    "explicit" (only `load_models` at start, then the repository API's load/unload). `log_file`: Triton's output
    (and the models'), else this process's stdout."""

    def __init__(self, repository: str | Path, http_port: int = 0, grpc_port: int = 0,
                 log_file: str | Path | None = None, log_verbose: int = 0, address: str = HOST,
                 metrics_port: int | None = None, model_control_mode: str = "none",
                 load_models: Sequence[str] = ()) -> None:
        if model_control_mode not in CONTROL_MODES:
            raise BackendError(f"model control mode {model_control_mode!r} is not one of {CONTROL_MODES}")
        if load_models and model_control_mode != "explicit":
            raise BackendError("models to load at start are named in the explicit model control mode only")
        self.repository = Path(repository).absolute()
        self.address = address
        self.http_port = http_port or free_port(address)
        self.grpc_port = grpc_port or free_port(address)
        self.metrics_port = None if metrics_port is None else metrics_port or free_port(address)
        self.log_file = Path(log_file) if log_file else None
        self.log_verbose = log_verbose
        self.model_control_mode = model_control_mode
        self.load_models = list(load_models)
        self.process: subprocess.Popen | None = None
        self._backends: Path | None = None

    def _url(self, port: int) -> str:
        """Where a client on this machine reaches a port (an endpoint on every interface: through loopback)."""
        return f"{HOST if self.address in ('0.0.0.0', '::') else self.address}:{port}"

    @property
    def http_url(self) -> str:
        return self._url(self.http_port)

    @property
    def grpc_url(self) -> str:
        return self._url(self.grpc_port)

    @property
    def metrics_url(self) -> str | None:
        """The metrics endpoint (Prometheus text), or None when metrics are off."""
        return None if self.metrics_port is None else f"http://{self._url(self.metrics_port)}/metrics"

    def command(self, backends: Path) -> tuple[list[str], dict[str, str]]:
        """The tritonserver command line and the environment it needs."""
        server, _, libs = wheel_paths()
        env = dict(os.environ)
        library_path = [str(libs), str(sysconfig.get_config_var("LIBDIR"))]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(library_path + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        command = [str(server / "bin" / "tritonserver"), "--model-repository", str(self.repository),
                   "--backend-directory", str(backends), "--http-address", self.address,
                   "--http-port", str(self.http_port), "--grpc-address", self.address, "--grpc-port",
                   str(self.grpc_port), "--exit-timeout-secs", "10", "--log-verbose", str(self.log_verbose),
                   "--model-control-mode", self.model_control_mode, *(f"--load-model={m}" for m in self.load_models)]
        if self.metrics_port is None:
            command += ["--allow-metrics", "false"]
        else:  # no GPU metrics: the wheel's server has no DCGM, and a GPU container adds them by its defaults
            command += ["--allow-metrics", "true", "--allow-gpu-metrics", "false", "--metrics-address", self.address,
                        "--metrics-port", str(self.metrics_port)]
        return command, env

    def start(self, timeout_s: float = 120.0) -> "LocalServer":
        available, why = availability()
        if not available:
            raise BackendError(why)
        server, stub, _ = wheel_paths()
        self._backends = Path(tempfile.mkdtemp(prefix="mirasol-triton-backends-"))
        shutil.copytree(server / "backends", self._backends, dirs_exist_ok=True)
        shutil.copy2(stub, self._backends / "python" / "triton_python_backend_stub")
        command, env = self.command(self._backends)
        log = open(self.log_file, "ab") if self.log_file else None  # None: this process's stdout
        try:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, preexec_fn=_end_with_parent)
        finally:
            if log is not None:
                log.close()
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            code = self.process.poll()
            if code is not None or time.monotonic() > deadline:
                self.stop()
                why = f"exited with {code}" if code is not None else f"not ready after {timeout_s:g} s"
                raise BackendError(f"tritonserver for {self.repository}: {why}; see its log "
                                   f"({self.log_file or 'above'})")
            time.sleep(0.2)
        return self

    def ready(self) -> bool:
        """Whether the server says it is ready (every model it was to load, loaded)."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as reply:
                return reply.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the server by its PID: SIGTERM (Triton unloads the models and ends their stubs), SIGKILL if late."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._backends is not None:
            shutil.rmtree(self._backends, ignore_errors=True)
            self._backends = None

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mirasol.runtime.triton.server", formatter_class=HelpFormatter,
        description="Serve a model repository (written by mirasol-triton) with the tritonserver of the "
                    "nvidia-pytriton wheel until interrupted.")
    parser.add_argument("repository", type=Path, help="model repository directory")
    parser.add_argument("--address", default=HOST,
                        help="where the HTTP, gRPC and metrics endpoints listen (0.0.0.0: every interface)")
    parser.add_argument("--http-port", type=PORT, default=8000, help="Triton's HTTP port (0: a free one)")
    parser.add_argument("--grpc-port", type=PORT, default=8001, help="Triton's gRPC port (0: a free one)")
    parser.add_argument("--metrics-port", type=PORT, default=8002,
                        help="Prometheus metrics at http://ADDRESS:PORT/metrics (Triton's and the model's own) "
                             "(0: a free one)")
    parser.add_argument("--no-metrics", action="store_true", help="no metrics endpoint")
    parser.add_argument("--log-file", type=Path, help="write Triton's log (and the models') here, appended; "
                                                      "default: this terminal")
    parser.add_argument("--log-verbose", type=bounded(int, 0, 9), default=0,
                        help="Triton's --log-verbose level (0: none, 1: request and model detail)")
    parser.add_argument("--model-control-mode", choices=CONTROL_MODES, default="none",
                        help="none: load every model once; poll: watch the repository for changes; explicit: load "
                             "only --load-model models, then as the repository API asks")
    parser.add_argument("--load-model", action="append", default=[], metavar="NAME",
                        help="with --model-control-mode explicit: a model to load at start (repeatable)")
    args = parser.parse_args(argv)
    if args.load_model and args.model_control_mode != "explicit":
        parser.error("--load-model needs --model-control-mode explicit")
    available, why = availability()
    if not available:
        print(f"error: {why}", file=sys.stderr)
        return 1
    try:
        server = LocalServer(args.repository, args.http_port, args.grpc_port, args.log_file, args.log_verbose,
                             args.address, None if args.no_metrics else args.metrics_port, args.model_control_mode,
                             args.load_model)
    except OSError as error:  # the address cannot be bound here (a free port was asked for)
        print(f"error: --address {args.address}: {error.strerror or error}", file=sys.stderr)
        return 1
    server_dir, _, _ = wheel_paths()
    command, env = server.command(Path("BACKENDS"))
    print("running: LD_LIBRARY_PATH=" + shlex.quote(env["LD_LIBRARY_PATH"]) + " " + shlex.join(command))
    print(f"  (BACKENDS: a copy of {server_dir / 'backends'} with the stub for this Python in python/)")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where started with SIGINT ignored
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `finally` stops the server
    try:
        server.start()
        metrics = f", metrics {server.metrics_url}" if server.metrics_url else ""
        print(f"ready: HTTP {server.http_url}, gRPC {server.grpc_url}{metrics}; Ctrl-C stops it", flush=True)
        server.process.wait()  # type: ignore[union-attr]
    except KeyboardInterrupt:
        pass
    except MirasolError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
