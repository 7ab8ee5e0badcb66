"""What ``idlm serve`` serves and how much it holds, and its logger: read by the server
(``server.py``) and by the HTTP handlers (``app.py``) alike."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from idlm.systems import System

LOG = logging.getLogger("idlm.serve")


@dataclass(frozen=True)
class ServerSettings:
    """What the server serves and how much it holds; ``port`` 0 picks a free port."""

    model_name: str
    mode: System = "isd"
    stride: int = 4
    host: str = "127.0.0.1"
    port: int = 8000
    max_waiting: int = 256          # requests queued beyond the running batch; then 429
    max_new_tokens: int | None = None   # cap on max_tokens (default: the context length)
    graceful_shutdown_s: float = 10.0   # in-flight requests get this long on SIGTERM
    log_level: str = "info"

    @property
    def engine_mode(self) -> Literal["ar", "isd"]:
        return "ar" if self.mode == "ar" else "isd"

    @property
    def engine_stride(self) -> int:
        return 1 if self.mode == "ar" else self.stride

    @property
    def fingerprint(self) -> str:
        return f"idlm-{self.mode}" + ("" if self.mode == "ar" else f"-n{self.stride}")
