"""PROMPTQ_WEBHOOK_ALLOW, parsed: the host names and networks an operator lets webhooks reach
beside public addresses.

In the core, not in promptq.webhooks: the settings refuse a malformed list when they are
read (every process, at start), and the core imports no domain package. The SSRF check
(promptq.webhooks.ssrf) is what applies it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_HOST_NAME: Final = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_-]{1,63})*$")


@dataclass(frozen=True)
class WebhookAllow:
    """PROMPTQ_WEBHOOK_ALLOW: host names and networks an operator lets webhooks reach beside
    public addresses (one internal n8n, say), finer than PROMPTQ_WEBHOOK_ALLOW_PRIVATE.
    Link-local and metadata addresses stay refused even here."""

    hosts: frozenset[str] = field(default_factory=frozenset)
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str) -> WebhookAllow:
        """Entries separated by commas or spaces: a host name (exact, any case), an
        address, or a network in CIDR form. ValueError names an entry that is none."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in re.split(r"[,\s]+", text.strip()):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = entry.lower().rstrip(".")
            if not _HOST_NAME.match(name):
                raise ValueError(f"{entry!r} is neither a host name nor an address or CIDR")
            hosts.add(name)
        return cls(frozenset(hosts), tuple(networks))

    def admits_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def admits(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.networks)


NO_ALLOW: Final = WebhookAllow()
