"""Hub access: fail fast (or use the local cache) when the HuggingFace hub cannot be reached."""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in OFFLINE_VARS)


def go_offline_if_unreachable() -> None:
    """Without a route to the hub, switch its clients to offline mode.

    transformers and datasets otherwise retry for about a minute per file before failing; in
    offline mode they fail at once, or load what their cache already holds.
    """
    if hub_offline() or any(os.environ.get(v) for v in PROXY_VARS):
        return
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        for var in OFFLINE_VARS:
            os.environ[var] = "1"
        for module, attribute in (("huggingface_hub.constants", "HF_HUB_OFFLINE"),
                                  ("datasets.config", "HF_HUB_OFFLINE")):
            if module in sys.modules:
                setattr(sys.modules[module], attribute, True)
