"""Bind the server's port before the model loads, so a busy port fails at once with the fix.

``serve`` and ``ui`` take minutes to load a model on a CPU; binding first means a port that is
taken (another server, a previous tinysft still running) costs a second, not a model load.
"""

from __future__ import annotations

import errno
import socket
from typing import Any


class PortError(OSError):
    """The address cannot be bound: the message names it and the fix."""


def bind_port(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), as uvicorn would open it. Raises PortError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a just-closed port is reusable
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortError(f"port {port} on {host} is already in use (another server, or an earlier tinysft still "
                            f"running) — stop it, or pass another port, e.g. --port {port + 1}.") from None
        if e.errno == errno.EACCES:
            raise PortError(f"not allowed to listen on port {port} — ports below 1024 need root; "
                            "pass --port 8000 or another port above 1023.") from None
        raise PortError(f"cannot listen on {host}:{port} ({e.strerror or e}) — check --host "
                        "(127.0.0.1 for this machine, 0.0.0.0 for every interface) and --port.") from None
    sock.set_inheritable(True)
    return sock


def run_on_socket(app: Any, sock: socket.socket) -> None:
    """Serve ``app`` with uvicorn on an already-bound socket until Ctrl-C."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", server_header=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
