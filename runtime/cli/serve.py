"""`mirasol-serve`: many live sources, questions and standing alerts over HTTP, on one Pipeline (the [serve] extra)."""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Any

from ..backends import BACKENDS, REGISTRY, BackendSettings, backend_entry
from ..errors import InputError
from ..media.feed import LATENCY_BOUND_S
from ..media.live_sources import FOREVER
from .commandline import UsageError, bounded, command_parser, or_word, run_command

TOKEN_ENV = "MIRASOL_SERVE_TOKEN"
LOOPBACK = ("127.0.0.1", "::1", "localhost")

EXAMPLES = f"""Examples:
  mirasol-serve bundles/demo                                   # http://127.0.0.1:8000, no token on loopback
  mirasol-serve bundles/demo --source cam1=udp://127.0.0.1:5000  # a source from the start
  {TOKEN_ENV}=$(openssl rand -hex 16) mirasol-serve bundles/demo --host 0.0.0.0   # beyond loopback: a token
  curl -s localhost:8000/sources -H 'Content-Type: application/json' -d '{{"id": "cam2", "url": "rtsp://10.0.0.7/s"}}'
  curl -s localhost:8000/sources/cam1/ask -H 'Content-Type: application/json' -d '{{"question": "what shape?"}}'
(docs/serve.md has the whole API)"""


def _parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "mirasol-serve",
        "Serve a bundle over HTTP: live sources added and removed at run time, all pushed through one Pipeline "
        "in fair batches; questions answered whole or token by token (SSE, WebSocket), stamped with the media and "
        "capture times of the chunks they rest on; standing questions that alert; state snapshots; Prometheus "
        "metrics; a page to watch it (GET /).", epilog=EXAMPLES, quiet=True)
    parser.add_argument("bundle", type=Path, help="bundle directory written by mirasol-export")
    net = parser.add_argument_group("network and safety")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on; beyond loopback a token is required")
    net.add_argument("--port", type=bounded(int, 0, 65535), default=8000, help="port (0: any free one)")
    net.add_argument("--token-file", type=Path, metavar="FILE",
                     help=f"a file holding the API token (or set {TOKEN_ENV}); clients send "
                          f"'Authorization: Bearer TOKEN'")
    net.add_argument("--allow-local-sources", action="store_true",
                     help="let clients add paths: files (played at their pace), named pipes and V4L2 cameras "
                          "(network URLs are always allowed)")
    net.add_argument("--max-sources", type=bounded(int, 1, 10_000), default=32, metavar="N",
                     help="sources at once (more: 429)")
    net.add_argument("--max-question-chars", type=bounded(int, 1, 100_000), default=1000, metavar="N",
                     help="longest question, standing ones too (more: 413)")
    net.add_argument("--max-request-kb", type=bounded(int, 1, 1 << 20), default=64, metavar="KB",
                     help="largest JSON body or WebSocket message")
    net.add_argument("--max-state-mb", type=bounded(int, 1, 1 << 20), default=1024, metavar="MB",
                     help="largest state file a PUT /sources/ID/state may send")
    net.add_argument("--max-questions", type=bounded(int, 1, 100_000), default=64, metavar="N",
                     help="questions waiting or being answered, all sources together (more: 429)")
    net.add_argument("--webhook", metavar="URL", help="POST every alert of a standing question here (JSON)")
    run = parser.add_argument_group("inference")
    run.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                     help="; ".join(f"{e.name}: {e.help}" for e in REGISTRY.values()))
    run.add_argument("--threads", type=bounded(int, 1, 1024), metavar="N", help="onnxruntime intra-op threads")
    run.add_argument("--no-verify", action="store_true", help="skip the graph checksums (faster start)")
    run.add_argument("--no-batch", action="store_true",
                     help="push each source's chunk on its own instead of one push_streams call per round")
    run.add_argument("--max-new-tokens", type=bounded(int, 1, 4096), metavar="N",
                     help="answer length when a question does not say (default: the bundle's, or what the question "
                          "leaves of the context where that is less)")
    sources = parser.add_argument_group("sources (defaults for what a request leaves out)")
    sources.add_argument("--source", action="append", default=[], metavar="[ID=]URL",
                         help="a source added at start (repeatable); the operator's may be local paths")
    sources.add_argument("--latency-bound", type=bounded(float, 0.01, 3600.0), default=LATENCY_BOUND_S,
                         metavar="SECONDS", help="capture to av_context that drop-oldest keeps to")
    sources.add_argument("--stall-timeout", type=bounded(float, 0.1, 3600.0), default=5.0, metavar="SECONDS",
                         help="seconds without data that end a connection (then reconnect); each reopen waits "
                              "as long")
    sources.add_argument("--reconnect", type=or_word(bounded(int, 0, 1_000_000), FOREVER), default=None,
                         metavar="ATTEMPTS",
                         help=f"reconnect attempts in a row before a source is reported failed (0: at the first "
                              f"failure), or '{FOREVER}' "
                              f"(default: {FOREVER})")
    sources.add_argument("--source-option", action="append", default=[], metavar="KEY=VALUE",
                         help="an FFmpeg option for every source, e.g. rtsp_transport=tcp (repeatable)")
    return parser



def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as error:
            raise InputError(f"--token-file {args.token_file}: {error.strerror}") from None
    else:
        token = os.environ.get("MIRASOL_SERVE_TOKEN", "").strip()  # TOKEN_ENV
    if token and len(token) < 16:
        raise UsageError("the token must be at least 16 characters (e.g. openssl rand -hex 16)")
    if not token and args.host not in LOOPBACK:
        raise UsageError(f"--host {args.host} is beyond loopback: give a token (--token-file or {TOKEN_ENV})")
    return token or None


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..pipeline import Pipeline
    from ..serve.app import guarded
    from ..serve.service import Limits, Service
    from ..serve.sources import SourceDefaults, parse_source

    token = _token(args)
    options = {}
    for pair in args.source_option:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--source-option wants KEY=VALUE, got {pair!r}")
        options[key] = value
    defaults = SourceDefaults(latency_bound=args.latency_bound, stall_timeout=args.stall_timeout,
                              reconnect=args.reconnect, options=options)
    first: list[dict[str, Any]] = []
    for i, given in enumerate(args.source, 1):
        name, sep, url = given.partition("=")
        data = {"id": name, "url": url} if sep and "://" not in name else {"url": given}
        data.setdefault("id", f"source-{i}")
        parse_source(dict(data), defaults, True, data["id"])  # refuse a wrong one before listening
        first.append(data)
    limits = Limits(max_sources=args.max_sources, max_question_chars=args.max_question_chars,
                    max_request_bytes=1024 * args.max_request_kb, max_state_bytes=(1 << 20) * args.max_state_mb,
                    max_questions=args.max_questions)
    pipe = Pipeline.load(args.bundle, backend=args.backend, verify=not args.no_verify,
                         **backend_entry(args.backend).options(BackendSettings(threads=args.threads)))
    service = Service(pipe, limits, defaults, allow_local=args.allow_local_sources, batch=not args.no_batch,
                      webhook=args.webhook, max_new_tokens=args.max_new_tokens)
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(guarded(service, token, first), log_level="warning" if args.quiet else "info",
                            access_log=False, ws="websockets-sansio", ws_max_size=limits.max_request_bytes,
                            timeout_graceful_shutdown=3, lifespan="on")
    server = _server(uvicorn)(config)
    where = f"[{host}]" if ":" in host else host
    print(f"mirasol-serve: listening on http://{where}:{port} ({args.bundle}, "
          f"{'batched' if not args.no_batch else 'one by one'}, token {'required' if token else 'off'})",
          file=sys.stderr, flush=True)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        service.close()
        sock.close()
    if service.decoding:  # a source blocked in FFmpeg: its callbacks into a finalizing interpreter would crash it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if server.started else 1)
    return 0 if server.started else 1


def _server(uvicorn: Any) -> type:
    class Server(uvicorn.Server):
        """uvicorn's server where Ctrl-C or SIGTERM is the normal end: the sources stop, the exit status is 0
        (uvicorn raises the signal again after its shutdown); a second one forces the exit."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            self.force_exit = self.should_exit
            self.should_exit = True

    return Server


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), _serve, argv)


if __name__ == "__main__":
    sys.exit(main())
