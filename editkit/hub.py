"""Fast reachability check for the Hugging Face Hub.

Hub clients retry for about a minute when the network is down; a user (or a test)
offline should get a clear error at once instead."""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from .paths import hub_offline

__all__ = ["hub_reachable", "hub_offline_reason"]


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hub endpoint accepts a TCP connection within ``timeout`` seconds."""
    if hub_offline():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_offline_reason() -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    return f"{endpoint} is not reachable from this machine"
