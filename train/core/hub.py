"""Reaching the Hugging Face Hub: probe it once, and fall back to the local cache when it is unreachable."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

from train.core.log import get_logger

log = get_logger("hub")


@functools.cache
def offline_unless_hub_reachable() -> bool:
    """Probe the Hub once per process; if it cannot be reached, switch huggingface_hub, transformers and
    datasets to offline mode (the local HF cache only) and return False.

    Without this, every Hub id on a machine without network costs five retries with back-off (~55 s of
    "Retrying in 8s" lines) before the library gives up; offline, a cached id loads at once and an uncached
    one fails at once with our message. Same effect as HF_HUB_OFFLINE=1, which skips the probe.
    """
    import huggingface_hub.constants as hub_constants

    if hub_constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct probe proves nothing: leave it to the libraries
    url = urlparse(hub_constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
        return True
    except OSError as err:
        log.warning(
            "the Hub (%s) is unreachable (%s): using the local HF cache only, as with HF_HUB_OFFLINE=1",
            hub_constants.ENDPOINT,
            err.strerror or type(err).__name__,
        )
    os.environ["HF_HUB_OFFLINE"] = "1"  # processes started from here
    hub_constants.HF_HUB_OFFLINE = True  # the libraries read these at call time
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    return False
