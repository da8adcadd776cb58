"""Reaching the Hugging Face Hub: probe it once, and fall back to the local cache when it is unreachable.

The probe opens one TCP connection, name resolution included, within PROBE_TIMEOUT seconds. It goes where the
libraries' own requests would go: to the proxy that HTTPS_PROXY / HTTP_PROXY / ALL_PROXY name for the endpoint
(read as urllib, requests and httpx read them), or straight to the endpoint when there is none or NO_PROXY covers
its host. Addresses are logged as scheme://host[:port]: a `user:pass@` in HF_ENDPOINT or a proxy URL never is.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import urllib.request
from urllib.parse import urlsplit

from train.core.log import get_logger

log = get_logger("hub")
PROBE_TIMEOUT = 5.0
DEFAULT_PORTS = {"http": 80, "https": 443, "socks4": 1080, "socks4a": 1080, "socks5": 1080, "socks5h": 1080}


# Set beside HF_HUB_OFFLINE=1 when our probe (not the user) switched a process offline, so that the process and
# those it starts can tell the two apart (train.export.hub: "--push-to-hub" says what failed, not "unset it").
FALLBACK_VARIABLE = "TRAIN_HUB_UNREACHABLE"


def redact_url(url: str) -> str:
    """scheme://host[:port] of `url`: no user, password, path or query (a token can hide in any of them)."""
    if "://" not in url:
        url = f"http://{url}"
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "?", parts.port
    except ValueError:  # a port that is not a number
        return "(unparsable URL)"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


def _host_port(url: str) -> tuple[str, int]:
    if "://" not in url:  # a proxy given as host:port, as urllib and httpx accept it
        url = f"http://{url}"
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or DEFAULT_PORTS.get(parts.scheme, 80)


def proxy_for(url: str) -> str | None:
    """The proxy a request to `url` goes through (HTTPS_PROXY for https, HTTP_PROXY for http, else ALL_PROXY),
    or None when there is none or NO_PROXY covers the host."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


def tcp_reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when a TCP connection to host:port opens within `timeout` seconds, else why not.

    Name resolution is inside the bound: socket.create_connection resolves first with no timeout (a dead DNS
    server blocks for minutes), so the attempt runs in a daemon thread that is given up on after `timeout`.
    """
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err.strerror or str(err) or type(err).__name__)

    thread = threading.Thread(target=attempt, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s, name lookup included"


def hub_unreachable() -> str | None:
    """What our probe found when it switched this process (or the one that started it) offline, e.g. "the Hub
    (https://huggingface.co) was unreachable when probed (...)"; None when it did not (a user-set
    HF_HUB_OFFLINE included)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" and os.environ.get(FALLBACK_VARIABLE):
        return os.environ[FALLBACK_VARIABLE]
    return None


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
    endpoint = hub_constants.ENDPOINT
    proxy = proxy_for(endpoint)
    if proxy:
        log.info("probing the Hub (%s) through the proxy %s", redact_url(endpoint), redact_url(proxy))
    reason: str | None
    try:
        host, port = _host_port(proxy or endpoint)
    except ValueError:  # a port that is not a number: the libraries could not connect either
        reason = "its address does not parse"
    else:
        reason = tcp_reachable(host, port)
    if reason is None:
        return True
    via = f" through the proxy {redact_url(proxy)}" if proxy else ""
    found = f"the Hub ({redact_url(endpoint)}) was unreachable{via} when probed ({reason})"
    log.warning("%s: using the local HF cache only, as with HF_HUB_OFFLINE=1", found)
    os.environ["HF_HUB_OFFLINE"] = "1"  # processes started from here
    os.environ[FALLBACK_VARIABLE] = found
    hub_constants.HF_HUB_OFFLINE = True  # the libraries read these at call time
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    return False
