"""The server on a background thread, beside the terminal chat of a bare start (llamafile's way).

Both share one engine: the server's worker and the chat each hold `engine.lock` while they
generate. The port is the one asked for or, when that is taken (a second copy running, another
program), the next free one: someone who double-clicked a file has no flag to change.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from ggufile.runtime.errors import GGUFileError
from ggufile.runtime.server.app import _url, bind_socket, create_app, make_server
from ggufile.runtime.server.guard import LOOPBACK_HOSTS, is_loopback

PORT_TRIES = 10
START_TIMEOUT = 30.0


class BackgroundServer:
    def __init__(self, engine, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
                 allowed_origins: Iterable[str] = (), defaults=None, embeddings: bool = False,
                 parallel: int = 1):
        app = create_app(engine, api_key=api_key, allowed_hosts=LOOPBACK_HOSTS if is_loopback(host) else None,
                         allowed_origins=allowed_origins, defaults=defaults, embeddings=embeddings,
                         parallel=parallel)
        self.sock = _bind_near(host, port)
        self.server = make_server(app, self.sock)
        self.url = _url(host, self.sock.getsockname()[1])
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="ggufile-server")

    def start(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise GGUFileError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)
        self.sock.close()


def _bind_near(host: str, port: int):
    """Listen on `port`, else on one of the next few, else on any free port."""
    candidates = [port + i for i in range(PORT_TRIES) if port and port + i < 65536] + [0]
    for candidate in candidates:
        try:
            return bind_socket(host, candidate)
        except GGUFileError as err:
            last = err
    raise last
