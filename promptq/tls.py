"""TLS for promptq's outgoing HTTPS: the upstream's connections and the webhooks' POSTs."""

from __future__ import annotations

import ssl

from urllib3.util.ssl_ import create_urllib3_context


def verifying_context(ca_file: str) -> ssl.SSLContext:
    """One TLS context for every HTTPS connection of a client, its CA bundle loaded once,
    verifying the certificate and the host name as urllib3's own contexts do.

    Given the bundle's path instead (`ca_certs`), urllib3 loads it into a new context for
    every new connection: 16 ms of CPU for certifi's on the 2-core AMD box, more than a
    whole job's path costs a worker, paid by every webhook POST and every new upstream
    connection. A context is safe to share between threads; urllib3 sets only its
    verify_mode on it, to the value it has."""
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    context.load_verify_locations(cafile=ca_file)
    return context
