"""Which webhook targets promptq refuses: anything that is not a public address on the Internet.

A webhook URL is chosen by a client, and promptq posts to it from inside the operator's
network; without this check any API key could make promptq call its Redis, its database or a
cloud metadata service. Two layers use it: `check_url` at intake (fails fast, no DNS) and the
sender, which checks the address it actually connects to (see `sender.py`).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Final

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from promptq.errors import InvalidRequest
from promptq.webhook_allow import NO_ALLOW, IPAddress, WebhookAllow

ALLOW_PRIVATE_HINT: Final = (
    "promptq refuses private targets unless PROMPTQ_WEBHOOK_ALLOW_PRIVATE=true, or the host "
    "or its network is in PROMPTQ_WEBHOOK_ALLOW"
)
METADATA_HINT: Final = (
    "promptq never sends webhooks to cloud metadata or link-local addresses, whatever "
    "PROMPTQ_WEBHOOK_ALLOW_PRIVATE and PROMPTQ_WEBHOOK_ALLOW say"
)


def refusal_hint(allow_private: bool) -> str:
    return METADATA_HINT if allow_private else ALLOW_PRIVATE_HINT


LOOPBACK = "a loopback address"
PRIVATE = "a private address"
LINK_LOCAL = "a link-local address"
METADATA = "a cloud metadata address"

# Instance metadata services hand out the machine's cloud credentials. Most sit in ranges
# refused anyway; listing them gives the clearer reason, and catches the ones that do not
# (Azure's wire server is a public Microsoft address reachable only from inside Azure).
_METADATA_ADDRESSES: Final = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure wire server
    )
)

# Refused in every mode: whatever sits on the link (a metadata service, a hypervisor's
# agent) is the machine's, never a webhook receiver. fd00:ec2::/32 is AWS's IPv6 range for
# its instance services, inside the unique-local range otherwise allowed with
# PROMPTQ_WEBHOOK_ALLOW_PRIVATE.
_ALWAYS_REFUSED: Final = tuple(
    (ipaddress.ip_network(net), reason)
    for net, reason in (
        ("169.254.0.0/16", LINK_LOCAL),
        ("fe80::/10", LINK_LOCAL),
        ("fd00:ec2::/32", "a cloud metadata (fd00:ec2::/32) address"),
    )
)

# Checked in order, so the most specific reason wins. Python's own `is_private`/`is_global`
# tables changed between 3.11 patch releases and miss some ranges (3.11.7 calls
# 64:ff9b::7f00:1 and fec0::1 global), so the classes that matter are spelled out here.
_V4_RANGES: Final = tuple(
    (ipaddress.IPv4Network(net), reason)
    for net, reason in (
        # Linux connects 0.0.0.0 (and 0.x.y.z) to this host itself.
        ("0.0.0.0/8", "an unspecified (0.0.0.0/8) address"),
        ("127.0.0.0/8", LOOPBACK),
        ("169.254.0.0/16", LINK_LOCAL),
        ("100.64.0.0/10", "a shared address space (100.64.0.0/10, carrier-grade NAT) address"),
        ("10.0.0.0/8", PRIVATE),
        ("172.16.0.0/12", PRIVATE),
        ("192.168.0.0/16", PRIVATE),
        ("224.0.0.0/4", "a multicast address"),
        ("255.255.255.255/32", "the broadcast address (reserved)"),
        ("240.0.0.0/4", "a reserved address"),
    )
)
_V6_RANGES: Final = tuple(
    (ipaddress.IPv6Network(net), reason)
    for net, reason in (
        ("::/128", "an unspecified (::) address"),
        ("::1/128", LOOPBACK),
        ("fe80::/10", LINK_LOCAL),
        ("fc00::/7", "a private (unique local, fc00::/7) address"),
        ("fec0::/10", "a private (deprecated site-local, fec0::/10) address"),
        ("ff00::/8", "a multicast address"),
        ("64:ff9b:1::/48", "a private (local-use NAT64, 64:ff9b:1::/48) address"),
    )
)
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")

# Names that never leave the machine or the local network, refused without asking DNS.
_LOOPBACK_NAMES: Final = frozenset(
    {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
)
_LOCAL_SUFFIXES: Final = (
    (".localhost", "a loopback host"),  # RFC 6761: always loopback
    (".local", "a local-network (mDNS) host"),
    (".internal", "a private-network host"),  # reserved for private use, like GCP metadata
    (".home.arpa", "a home-network host"),
)


class UnsafeTarget(InvalidRequest, ValueError):
    """A webhook target promptq will not call; the message says why and never holds the
    URL's credentials."""


def is_unsafe_address(ip: IPAddress) -> str | None:
    """Why promptq refuses to connect to `ip` (e.g. "a loopback address"), or None if it is a
    public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ipaddress.IPv6Address(int(ip))  # a zone id (fe80::1%eth0) changes nothing
    if ip in _METADATA_ADDRESSES:
        return METADATA
    if isinstance(ip, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(ip)) is not None:
        # The network delivers these to the IPv4 address inside: that one decides.
        inner, form = embedded
        reason = is_unsafe_address(inner)
        if form == "IPv4-compatible":
            # Deprecated (RFC 4291) and never a real endpoint, whatever it embeds.
            reason = reason or "a reserved address"
        return f"{reason} ({inner}) in {form} IPv6 form" if reason else None
    ranges = _V4_RANGES if isinstance(ip, ipaddress.IPv4Address) else _V6_RANGES
    for network, reason in ranges:
        if ip in network:
            return reason
    if not ip.is_global:
        # Documentation, benchmarking, IETF protocol (Teredo, ...) and other ranges no
        # public webhook endpoint lives in.
        return "a special-purpose (non-public) address"
    return None


def refusal_reason(
    ip: IPAddress, allow_private: bool, allow: WebhookAllow = NO_ALLOW, host: str | None = None
) -> str | None:
    """Why promptq will not connect to `ip` (reached by the name `host`, if any) under the
    settings, or None. Cloud metadata and link-local addresses are refused even with
    PROMPTQ_WEBHOOK_ALLOW_PRIVATE or PROMPTQ_WEBHOOK_ALLOW: a local setup never needs them,
    and they are what an attacker aims a webhook at first (the machine's credentials)."""
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ipaddress.IPv6Address(int(ip))
    always = _always_refused(ip)
    if always is not None:
        return always
    if allow_private or allow.admits(ip) or (host is not None and allow.admits_host(host)):
        return None
    return is_unsafe_address(ip)


def _always_refused(ip: IPAddress) -> str | None:
    if ip in _METADATA_ADDRESSES:
        return METADATA
    if isinstance(ip, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(ip)) is not None:
        inner, form = embedded
        reason = _always_refused(inner)
        return f"{reason} ({inner}) in {form} IPv6 form" if reason else None
    for network, reason in _ALWAYS_REFUSED:
        if ip.version == network.version and ip in network:
            return reason
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 one carries, and the name of the form, if it carries one."""
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip in _NAT64:
        return low32, "NAT64"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # not :: nor ::1
        return low32, "IPv4-compatible"
    return None


def _parse_ip_literal(host: str) -> IPAddress | None:
    """The address a URL host spells, in any form a resolver accepts, or None for a name.

    Besides dotted quads and IPv6, resolvers take the legacy inet_aton forms: decimal
    (2130706433), octal (0177.0.0.1), hex (0x7f.1, 0x7f000001) and short (127.1, 10.1).
    """
    host = host.strip("[]").split("%", 1)[0]  # brackets and zone id of an IPv6 literal
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        # What getaddrinfo itself does with a numeric host; it also takes "127.1 junk".
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def check_url(url: str, allow_private: bool = False, allow: WebhookAllow = NO_ALLOW) -> None:
    """Refuse a webhook URL at intake: not http(s), no host, or a host that is an unsafe
    address literal or a well-known local name. No DNS: names are checked again, on the
    address connected to, when the webhook is sent.

    Credentials in the URL are allowed (they become Basic auth) but never appear in a message.
    """
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise UnsafeTarget("webhook_url holds a control character; percent-encode it")
    try:
        # urllib3's parser, because it is the one the sender connects with: a second parser
        # could read another host out of the same string ("http://a.com\\@127.0.0.1/").
        parsed = parse_url(url)
    except LocationParseError:
        # `from None`: the parser's message quotes the URL, credentials and all.
        raise UnsafeTarget(
            "webhook_url is not a valid URL (its host or port cannot be read)"
        ) from None
    scheme = (parsed.scheme or "").lower()
    if scheme not in ("http", "https"):
        shown = f"a {scheme}: URL" if scheme else "a URL without a scheme"
        raise UnsafeTarget(f"webhook_url must be an http:// or https:// URL, not {shown}")
    host = (parsed.host or "").lower()
    # A trailing dot only marks a name as fully qualified: 127.0.0.1. is 127.0.0.1.
    bare = host.rstrip(".")
    if not bare:
        raise UnsafeTarget("webhook_url has no host")
    ip = _parse_ip_literal(bare)
    if ip is not None:
        reason = refusal_reason(ip, allow_private, allow)
        if reason is not None:
            spelled = host if host.strip("[]") == str(ip) else f"{host} = {ip}"
            hint = refusal_hint(allow_private or _always_refused(ip) is not None)
            raise UnsafeTarget(f"webhook_url points at {reason} ({spelled}); {hint}")
        return
    if allow_private or allow.admits_host(bare):
        return
    reason = _local_name_reason(bare)
    if reason is not None:
        raise UnsafeTarget(f"webhook_url names {reason} ({bare}); {ALLOW_PRIVATE_HINT}")


def _local_name_reason(name: str) -> str | None:
    if name in _LOOPBACK_NAMES:
        return "a loopback host"
    for suffix, reason in _LOCAL_SUFFIXES:
        if name.endswith(suffix):
            return reason
    if "." not in name:
        # A single label ("redis", "db") only resolves through local search domains.
        return "a single-label local-network host"
    return None
