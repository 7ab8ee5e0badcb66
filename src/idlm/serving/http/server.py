"""``idlm serve``: an OpenAI-compatible HTTP server over the batched decoding engine.

One engine thread (``worker.EngineWorker``) owns the model and runs a continuous-batching
session; the FastAPI handlers (``app.py``) render prompts, hand requests to it through a
thread-safe queue and await the results or stream the tokens as they are committed.
The server runs one mode (ar | isd | risd) at one stride, under one model name.

    server = build_server(engine, ServerSettings(model_name="idlm-tiny", mode="isd"))
    server.run()    # uvicorn; SIGINT / SIGTERM shut it down cleanly
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from idlm.serving.http.settings import ServerSettings

KEEP_ALIVE_S = 75


def build_server(engine: Any, settings: ServerSettings, *, announce: bool = True) -> Any:
    """A uvicorn server (not started) for ``engine``; ``announce`` prints the URL when up."""
    import uvicorn

    from idlm.serving.http.app import build_app

    app = build_app(engine, settings)
    # Keep idle connections longer than clients and proxies do (uvicorn's default is 5 s):
    # a client that reuses a connection the server is closing at that instant gets a
    # dropped request (seen once in 2048 under the overload test's 256 clients).
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level, access_log=False,
                            timeout_keep_alive=KEEP_ALIVE_S,
                            timeout_graceful_shutdown=settings.graceful_shutdown_s)

    class AnnouncingServer(uvicorn.Server):
        """Knows its bound URL once started (port 0 resolves to the real port)."""

        url: str | None = None

        async def startup(self, sockets: list | None = None) -> None:
            await super().startup(sockets=sockets)
            if not self.started:
                return
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.url = f"http://{_url_host(host)}:{port}"
            if announce:
                print(f"idlm serve: {settings.model_name} ({settings.fingerprint}) ready at "
                      f"{self.url}/v1", flush=True)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            """uvicorn's, minus re-raising the signal after the graceful shutdown: a
            SIGTERM / Ctrl-C that stopped the server cleanly is a clean exit (status 0)."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return AnnouncingServer(config)


def serve(engine: Any, settings: ServerSettings) -> int:
    """Run until SIGINT / SIGTERM; 0 on a clean shutdown, 1 if the port could not be bound."""
    server = build_server(engine, settings)
    server.run()
    if not server.started:
        print(f"error: could not serve on {settings.host}:{settings.port} (see above)",
              file=sys.stderr)
        return 1
    print("idlm serve: stopped", flush=True)
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
