"""Running the service: load the model, bind the socket, run uvicorn until a signal."""

import logging
import os
import socket
from dataclasses import asdict, replace
from pathlib import Path

from ..errors import BadExpertError
from .app import GuardAdapter
from .logs import configure_logging, log_event, restore_logging
from .settings import Settings, require_server_deps


def _package():
    import sys

    return sys.modules[__package__]


def load_service_model(bundle: str | None = None, *, onnx: str | None = None, bare: bool = False,
                       allow_factories=()):
    """The service model from a bundle (torch) or an exported ONNX guard; a damaged file is one
    BadExpertError. A bundle of a user's factory model imports it only when ``allow_factories``
    names it."""
    if (bundle is None) == (onnx is None):
        raise BadExpertError("serve needs exactly one of a bundle file or an ONNX file")
    if onnx is not None:
        if bare:
            raise BadExpertError("bare mode needs a bundle, not an ONNX file")
        try:
            from ..runtime.onnx import OnnxGuard
        except ImportError as exc:
            raise BadExpertError(f"cannot serve an ONNX file: {str(exc).splitlines()[0]}") from exc
        return OnnxGuard(onnx)
    from ..deploy.guard import load_bundle

    return GuardAdapter(load_bundle(bundle, allow_factories=allow_factories), bare=bare)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port), or one BadExpertError."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise BadExpertError(f"port must be 0-65535, got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BadExpertError(f"cannot resolve host '{host}' ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise BadExpertError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def serve(bundle: str | None, host: str = "127.0.0.1", port: int = 8000, *, settings: Settings | None = None,
          onnx: str | None = None, bare: bool = False, threads: int | None = None, log_level: str = "info",
          allow_factories=()) -> None:
    """Load ``bundle`` (or ``onnx``), bind ``host:port`` and serve until SIGTERM or SIGINT
    (graceful: requests in flight are answered; after SIGTERM this returns normally, after SIGINT
    KeyboardInterrupt follows). Everything that can be checked is checked before the socket is
    bound; each problem is one BadExpertError."""
    import signal
    import threading

    _, uvicorn = require_server_deps()
    settings = settings or Settings()
    if settings.name is None:  # the Open Inference Protocol's model name: the file's stem unless --name says
        settings = replace(settings, name=Path(str(onnx if onnx is not None else bundle)).stem)
    settings = settings.validate()
    if getattr(logging, str(log_level).upper(), None) is None or str(log_level).lower() not in (
            "debug", "info", "warning", "error", "critical"):
        raise BadExpertError(f"unknown log level '{log_level}'; choose debug, info, warning or error")
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise BadExpertError(f"threads must be a positive integer, got {threads!r}")
        if onnx is None:  # the ONNX service never imports torch
            import torch

            torch.set_num_threads(threads)
    model = load_service_model(bundle, onnx=onnx, bare=bare, allow_factories=allow_factories)
    app = _package().create_app(model, settings=settings)  # looked up at call time: tests may replace it
    sock = bind_socket(host, port)
    handler = configure_logging(log_level)
    main_thread = threading.current_thread() is threading.main_thread()
    # uvicorn re-raises the signal it shut down for once it has restored the previous handler: a
    # no-op SIGTERM handler makes a graceful SIGTERM shutdown end normally (exit status 0)
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main_thread else None
    try:
        log_event(logging.INFO, "listening", host=host, port=sock.getsockname()[1], source=str(onnx or bundle),
               model=getattr(model, "info", {}).get("kind"), pid=os.getpid(),
               settings={**asdict(settings), "max_queue": settings.queue_limit})
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", server_header=False,
                                timeout_graceful_shutdown=30)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        log_event(logging.INFO, "stopped")
        restore_logging(handler)


__all__ = ["bind_socket", "load_service_model", "serve"]
