"""Clients with several server URLs: how addresses are read and which errors send a
request on to another replica (the failover itself runs against real servers in
tests/integration/test_replicas.py)."""

from __future__ import annotations

import asyncio

import pytest
from tritonclient.utils import InferenceServerException

from serving.client import AsyncRecommenderClient, RecommenderClient, split_urls, unreachable


def test_split_urls():
    assert split_urls("a:1") == ["a:1"]
    assert split_urls("a:1, b:2,") == ["a:1", "b:2"]
    assert split_urls(["a:1", "b:2"], ["b:2", "c:3"]) == ["a:1", "b:2", "c:3"]
    assert split_urls(None) == []


@pytest.mark.parametrize(
    ("exc", "moves_on"),
    [
        (
            InferenceServerException(
                "failed to connect to all addresses", "StatusCode.UNAVAILABLE"
            ),
            True,
        ),
        (InferenceServerException("Socket closed", "StatusCode.UNAVAILABLE"), True),
        (InferenceServerException("Stream removed", "StatusCode.UNKNOWN"), True),
        (ConnectionRefusedError(111, "Connection refused"), True),
        (
            InferenceServerException("input 'k': expected >= 1", "StatusCode.INVALID_ARGUMENT"),
            False,
        ),
        (InferenceServerException("retrieval version 3 failed", "StatusCode.INTERNAL"), False),
        (InferenceServerException("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED"), False),
    ],
)
def test_which_errors_go_to_another_replica(exc, moves_on):
    assert unreachable(exc) is moves_on


def test_one_url_or_several():
    with RecommenderClient("h1:8001, h2:8001") as c:
        assert c.urls == ["h1:8001", "h2:8001"] and c.url == "h1:8001"
    with RecommenderClient(urls=["h1:8001"]) as c:
        assert c.urls == ["h1:8001"]
    with RecommenderClient() as c:  # the protocol's default
        assert c.urls == ["localhost:8001"]

    async def several() -> list[str]:  # the asyncio client is made inside a running loop
        client = AsyncRecommenderClient("h1:8001,h2:8001")
        try:
            return client.urls
        finally:
            await client.close()

    assert asyncio.run(several()) == ["h1:8001", "h2:8001"]


def test_dns_entries_expand_to_every_address_the_name_has_now():
    from serving.discovery import DiscoveryError

    got = split_urls("dns:localhost:8001")
    assert got and all(u.endswith(":8001") for u in got)
    assert "127.0.0.1:8001" in got or "[::1]:8001" in got
    assert split_urls(["dns:localhost:8001", "b:2"])[-1] == "b:2"
    with pytest.raises(DiscoveryError, match=r"no-such-host\.invalid does not resolve"):
        split_urls("dns:no-such-host.invalid:8001")
    with pytest.raises(ValueError, match="expected dns:NAME:PORT"):
        split_urls("dns:triton-headless")
