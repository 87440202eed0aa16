"""Request bodies of hostile callers (issue 13): a stranger's body is never read, and the
largest batch the defaults admit fits deploy/'s memory limits."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from helpers import REPO, running_api

from promptq.config import Settings

# API memory per MB of batch while it is parsed and stored (README, Security), measured with
# requests of about 250 bytes each; larger requests cost less per MB.
BATCH_MIB_PER_MB = 12
# What `promptq api` holds before any request.
API_BASELINE_MIB = 150


@pytest.fixture(scope="module")
def api_url(test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_api(test_env, tmp_path_factory.mktemp("api") / "api.log") as url:
        yield url


def first_answer(url: str, path: str, key_header: bytes, timeout: float = 15) -> bytes:
    """Send the headers of a 60 kB body (under the tests' 64 KiB limit) and only its first
    kilobyte, then read whatever the server answers. A server that reads the body before
    it authenticates waits for the rest, and the socket times out."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: promptq\r\n"
            b"Content-Type: application/json\r\nContent-Length: 60000\r\n"
            + key_header
            + b"\r\n"
            + b'{"requests": ['
            + b" " * 1000
        )
        return sock.recv(65536)


@pytest.mark.parametrize(
    "path",
    ["/v1/webhooks", "/v1/templates", "/v1/jobs", "/v1/messages", "/v1/messages/batches"],
)
@pytest.mark.parametrize("key_header", [b"", b"x-api-key: pq_not-a-key\r\n"])
def test_an_unauthenticated_body_is_never_read(api_url: str, path: str, key_header: bytes) -> None:
    answer = first_answer(api_url, path, key_header)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"connection: close" in answer.lower()


def test_an_authenticated_body_is_still_read(api_url: str, make_key: Any) -> None:
    """The check is on the key, not on every body: a valid key's partial body is waited for
    (the socket times out) rather than refused."""
    key = make_key()
    with pytest.raises(TimeoutError):
        first_answer(api_url, "/v1/webhooks", f"x-api-key: {key}\r\n".encode(), timeout=3)


def test_the_default_batch_limit_fits_the_api_pod() -> None:
    manifests = yaml.safe_load_all((REPO / "deploy" / "k8s" / "api.yaml").read_text())
    deployment = next(m for m in manifests if m and m.get("kind") == "Deployment")
    (container,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "api"
    ]
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    batch_mb = Settings.model_fields["max_batch_bytes"].default / 1e6
    assert API_BASELINE_MIB + batch_mb * BATCH_MIB_PER_MB <= int(limit.removesuffix("Mi"))
