"""TLS for promptq's outgoing HTTPS: the upstream's connections and the webhooks' POSTs."""

from __future__ import annotations

import ssl

from urllib3.util.ssl_ import create_urllib3_context


def verifying_context(ca_file: str) -> ssl.SSLContext:
    """One TLS context for every HTTPS connection of a client, its CA bundle loaded once,
    verifying the certificate and the host name as urllib3's own contexts do.

    Given the bundle's path instead (`ca_certs`), urllib3 loads it into a new context for
    every new connection: with certifi's bundle a webhook POST over HTTPS cost 22 ms of CPU
    against 2.1 with one context (bench/webhook_post.py --https, the 2-core AMD box), more
    than a whole job's path costs a worker; every new upstream connection paid the same. A
    context is safe to share between threads; urllib3 sets only its verify_mode on it, to
    the value it has."""
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    context.load_verify_locations(cafile=ca_file)
    return context
