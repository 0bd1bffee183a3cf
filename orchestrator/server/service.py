"""`kiln serve`: the embedded Triton server and the API on uvicorn, in one process tree.

Shutdown order on SIGTERM/SIGINT: uvicorn stops accepting connections and waits for the open
requests (generations in flight finish and are answered), the app's lifespan drains the job
queue, and only then is Triton stopped. The whole drain is bounded by `Settings.drain_timeout_s`
(`kiln serve --drain-timeout`): what is left then is cancelled.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time

from kiln.errors import KilnError
from orchestrator.security import check_exposure
from orchestrator.server.app import create_app
from orchestrator.server.settings import Settings


def run_api(settings: Settings, *, log_level: str = "info", on_started=None) -> None:
    """Serve the API until SIGINT/SIGTERM; returns after the graceful drain."""
    import uvicorn

    check_exposure(settings.listen, settings.security)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.listen, port=settings.port, log_level=log_level, ws="websockets-sansio",
                            timeout_graceful_shutdown=max(1, math.ceil(settings.drain_timeout_s)), access_log=False)
    server = uvicorn.Server(config)
    stop_accepting = server.shutdown

    async def shutdown(sockets=None):  # the drain's clock starts when uvicorn stops accepting (app.py's lifespan)
        app.state.draining_since = time.monotonic()
        await stop_accepting(sockets=sockets)

    server.shutdown = shutdown
    if on_started is not None:
        original = server.startup

        async def startup(sockets=None):
            await original(sockets=sockets)
            if server.started:
                on_started()

        server.startup = startup
    logging.getLogger("uvicorn.error").propagate = False
    # uvicorn drains on SIGTERM, then raises the signal again for the previous handler: make that a clean
    # return, so the caller can stop Triton and exit 0.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main else None
    try:
        server.run()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


class BackgroundAPI:
    """The app on a real uvicorn server in a background thread (tests and `kiln bench serve`)."""

    def __init__(self, settings: Settings, *, log_level: str = "warning", startup_timeout_s: float = 30.0) -> None:
        import time

        import uvicorn

        self.settings = settings
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=settings.listen, port=settings.port,
                                                    log_level=log_level, ws="websockets-sansio", access_log=False))
        self.thread = threading.Thread(target=self.server.run, name="kiln-api", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + startup_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise KilnError("the API server did not start")
            time.sleep(0.05)
        self.url = f"http://{settings.listen}:{settings.port}"

    def client(self, **kwargs):
        import httpx

        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
