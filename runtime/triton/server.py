"""Run the `tritonserver` of the `nvidia-pytriton` wheel (Triton 2.51, Python backend) on a model repository.

For CPU machines and tests: no container, loopback addresses only. What it takes: the wheel's backend directory
copied with the Python backend stub of this interpreter's version put in `backends/python/`; `LD_LIBRARY_PATH`
naming the wheel's `nvidia_pytriton.libs` and the directory of this interpreter's libpython; this interpreter's
`bin/` first on PATH (the stub runs the model with the Python it finds there, so a venv's packages are seen).
The server is stopped by its PID.

    python -m mirasol.runtime.triton.server REPOSITORY [--http-port 8000] [--grpc-port 8001]
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
from pathlib import Path

from ..cli.commandline import HelpFormatter, bounded
from ..errors import BackendError, MirasolError

PORT = bounded(int, 1, 65535)

HOST = "127.0.0.1"


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class LocalServer:
    """tritonserver on 127.0.0.1 serving `repository`; `start()` waits until it is ready, `stop()` ends it by PID."""

    def __init__(self, repository: str | Path, http_port: int = 0, grpc_port: int = 0,
                 log_file: str | Path | None = None, log_verbose: int = 0) -> None:
        self.repository = Path(repository).absolute()
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.log_file = Path(log_file) if log_file else None
        self.log_verbose = log_verbose
        self.process: subprocess.Popen | None = None
        self._backends: Path | None = None

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    def command(self, backends: Path) -> tuple[list[str], dict[str, str]]:
        """The tritonserver command line and the environment it needs."""
        server, _, libs = wheel_paths()
        env = dict(os.environ)
        library_path = [str(libs), str(sysconfig.get_config_var("LIBDIR"))]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(library_path + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        command = [str(server / "bin" / "tritonserver"), "--model-repository", str(self.repository),
                   "--backend-directory", str(backends), "--http-address", HOST, "--http-port", str(self.http_port),
                   "--grpc-address", HOST, "--grpc-port", str(self.grpc_port), "--allow-metrics", "false",
                   "--exit-timeout-secs", "10", "--log-verbose", str(self.log_verbose)]
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
                    "nvidia-pytriton wheel, on 127.0.0.1, until interrupted.")
    parser.add_argument("repository", type=Path, help="model repository directory")
    parser.add_argument("--http-port", type=PORT, default=8000, help="Triton's HTTP port")
    parser.add_argument("--grpc-port", type=PORT, default=8001, help="Triton's gRPC port")
    parser.add_argument("--log-verbose", type=bounded(int, 0, 9), default=0, help="Triton's --log-verbose level")
    args = parser.parse_args(argv)
    server = LocalServer(args.repository, args.http_port, args.grpc_port, log_verbose=args.log_verbose)
    available, why = availability()
    if not available:
        print(f"error: {why}", file=sys.stderr)
        return 1
    server_dir, _, _ = wheel_paths()
    command, env = server.command(Path("BACKENDS"))
    print("running: LD_LIBRARY_PATH=" + shlex.quote(env["LD_LIBRARY_PATH"]) + " " + shlex.join(command))
    print(f"  (BACKENDS: a copy of {server_dir / 'backends'} with the stub for this Python in python/)")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where started with SIGINT ignored
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `finally` stops the server
    try:
        server.start()
        print(f"ready: HTTP {server.http_url}, gRPC {server.grpc_url}; Ctrl-C stops it")
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
