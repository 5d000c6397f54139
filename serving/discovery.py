"""Replica addresses: a list, "a,b", or `dns:NAME:PORT` for every address NAME resolves to.

Under an autoscaler the set of Triton replicas changes, so a control job cannot carry a
fixed list. A headless Service (no cluster IP) answers a DNS query for its name with one
A/AAAA record per pod (with `publishNotReadyAddresses`, starting pods too), so
`dns:triton-headless:8001` is every replica at the moment of the call:

    split_urls("dns:triton-headless:8001")   # ["10.0.3.7:8001", "10.0.5.2:8001", ...]
    split_urls("a:8001, b:8001")              # ["a:8001", "b:8001"]

The name is resolved on each call, never cached here: a job that runs again sees the
replicas that exist then. A name that does not resolve is an error naming it, not an empty
list, because an empty fan-out would "switch" nothing and report success.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence

DNS_PREFIX = "dns:"


class DiscoveryError(OSError):
    """A `dns:` name that does not resolve (an OSError, like the connection errors callers
    already handle for a replica that does not answer)."""


def resolve(entry: str) -> list[str]:
    """`dns:NAME:PORT` -> "ip:port" for every address of NAME (sorted, IPv6 bracketed)."""
    spec = entry[len(DNS_PREFIX) :]
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{entry!r}: expected dns:NAME:PORT, e.g. dns:triton-headless:8001")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DiscoveryError(f"{entry!r}: {host} does not resolve ({exc.strerror})") from exc
    addrs = sorted({info[4][0] for info in infos})
    return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addrs]


def split_urls(url: str | Sequence[str] | None = None, urls: Iterable[str] | None = None):
    """Server addresses from `url` ("a", "a,b" or a list) and `urls`, in order, without
    repeats; each `dns:NAME:PORT` entry is replaced by the addresses NAME resolves to now."""
    parts: list[str] = []
    for u in [url] if isinstance(url, str) or url is None else list(url):
        parts += (u or "").split(",")
    for u in urls or ():
        parts += u.split(",")
    out: list[str] = []
    for p in (p.strip() for p in parts):
        if p:
            out += resolve(p) if p.startswith(DNS_PREFIX) else [p]
    return list(dict.fromkeys(out))
