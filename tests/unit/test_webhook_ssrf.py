"""Which webhook targets are refused, in every spelling a URL host can carry. Pure checks: no
request leaves, and check_url asks no DNS."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

from promptq.webhooks import UnsafeTarget, check_url, is_unsafe_address
from promptq.webhooks.sender import _sort_addresses
from promptq.webhooks.ssrf import WebhookAllow

HINT = "PROMPTQ_WEBHOOK_ALLOW_PRIVATE=true"

# (URL, the word the refusal must name), grouped by the class of address.
REFUSED_URLS = [
    # loopback
    ("http://127.0.0.1/", "loopback"),
    ("https://127.0.0.1:8443/hook?x=1", "loopback"),
    ("http://127.255.255.254/", "loopback"),
    ("http://2130706433/", "loopback"),  # decimal
    ("http://0177.0.0.1/", "loopback"),  # octal
    ("http://017700000001/", "loopback"),  # octal, one number
    ("http://0x7f.0.0.1/", "loopback"),  # hex
    ("http://0x7f000001/", "loopback"),  # hex, one number
    ("http://0X7F.0.0.1/", "loopback"),  # hex, uppercase
    ("http://127.1/", "loopback"),  # short
    ("http://0x7f.1/", "loopback"),  # short hex
    ("http://127.0.0.1./", "loopback"),  # trailing dot
    ("HTTP://127.0.0.1/", "loopback"),  # uppercase scheme
    ("http://%31%32%37.0.0.1/", "loopback"),  # percent-encoded
    ("http://alice:s3cret@127.0.0.1/", "loopback"),  # credentials
    ("http://[::1]/", "loopback"),
    ("http://[::1]:8000/", "loopback"),
    ("http://[0:0:0:0:0:0:0:1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),  # IPv4-mapped
    ("http://[::FFFF:7F00:1]/", "loopback"),  # IPv4-mapped, hex, uppercase
    ("http://[64:ff9b::127.0.0.1]/", "loopback"),  # NAT64
    ("http://[2002:7f00:1::]/", "loopback"),  # 6to4
    ("http://[::127.0.0.1]/", "loopback"),  # IPv4-compatible
    # private: RFC 1918, RFC 4193
    ("http://10.0.0.1/", "private"),
    ("http://10.1/", "private"),  # short
    ("http://012.0.0.1/", "private"),  # octal 10
    ("http://167772161/", "private"),  # decimal 10.0.0.1
    ("http://172.16.0.1/", "private"),
    ("http://172.31.255.255/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://0xc0.0xa8.1.1/", "private"),
    ("http://3232235777/", "private"),  # decimal 192.168.1.1
    ("http://192.168.1.1.:8080/", "private"),
    ("http://[fc00::1]/", "private"),
    ("http://[fd12:3456:789a::1]/", "private"),
    ("http://[FD00::1]/", "private"),
    ("http://[fec0::1]/", "private"),  # site-local
    ("http://[::ffff:10.0.0.1]/", "private"),
    ("http://[::ffff:c0a8:101]/", "private"),
    ("http://[64:ff9b::a00:1]/", "private"),  # NAT64 of 10.0.0.1
    ("http://[64:ff9b::192.168.1.1]/", "private"),
    ("http://[64:ff9b:1::1]/", "private"),  # local-use NAT64
    ("http://[2002:c0a8:101::]/", "private"),  # 6to4 of 192.168.1.1
    ("http://[::10.0.0.1]/", "private"),  # IPv4-compatible
    # link-local
    ("http://169.254.1.1/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fe80::1%25eth0]/", "link-local"),  # zone id
    ("http://[FE80::ABCD%25en0]:8080/", "link-local"),
    ("http://[::ffff:169.254.0.1]/", "link-local"),
    # cloud metadata
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://169.254.169.254./", "metadata"),
    ("http://0xa9fea9fe/", "metadata"),
    ("http://2852039166/", "metadata"),
    ("http://0251.0376.0251.0376/", "metadata"),
    ("http://169.254.43518/", "metadata"),  # short: 169.254.(43518 = 169*256+254)
    ("http://[fd00:ec2::254]/", "metadata"),
    ("http://[FD00:EC2:0:0:0:0:0:254]/", "metadata"),
    ("http://100.100.100.200/", "metadata"),
    ("http://[::ffff:169.254.169.254]/", "metadata"),
    ("http://[64:ff9b::169.254.169.254]/", "metadata"),
    # shared address space
    ("http://100.64.0.1/", "shared address space"),
    ("http://100.127.255.254/", "shared address space"),
    ("http://[::ffff:100.64.0.1]/", "shared address space"),
    # multicast
    ("http://224.0.0.1/", "multicast"),
    ("http://239.255.255.250:1900/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    # unspecified
    ("http://0.0.0.0/", "unspecified"),
    ("http://0.0.0.0:8000/", "unspecified"),
    ("http://0/", "unspecified"),
    ("http://0x0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://[0:0:0:0:0:0:0:0]/", "unspecified"),
    ("http://[::ffff:0.0.0.0]/", "unspecified"),
    # reserved and broadcast
    ("http://255.255.255.255/", "broadcast"),
    ("http://4294967295/", "broadcast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://[::8.8.8.8]/", "reserved"),  # IPv4-compatible: deprecated, even of a public one
    # other special-purpose ranges
    ("http://192.0.2.1/", "non-public"),  # documentation
    ("http://198.18.0.1/", "non-public"),  # benchmarking
    ("http://[2001:db8::1]/", "non-public"),  # documentation
    ("http://[2001::1]/", "non-public"),  # Teredo
    # names that never leave the machine or the local network
    ("http://localhost/", "loopback"),
    ("http://LOCALHOST:8000/", "loopback"),
    ("http://localhost./", "loopback"),
    ("http://api.localhost/", "loopback"),
    ("http://a.b.LocalHost:9000/", "loopback"),
    ("http://localhost.localdomain/", "loopback"),
    ("http://ip6-localhost/", "loopback"),
    ("http://printer.local/", "local-network"),
    ("http://metadata.google.internal/computeMetadata/v1/", "private-network"),
    ("http://nas.home.arpa/", "home-network"),
    ("http://redis:6379/", "single-label"),
]


@pytest.fixture(autouse=True)
def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_url decides without DNS: any lookup fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a DNS lookup: {args}")

    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
        monkeypatch.setattr(socket, name, refuse)


@pytest.mark.parametrize(("url", "word"), REFUSED_URLS)
def test_unsafe_targets_are_refused_naming_why(url: str, word: str) -> None:
    with pytest.raises(UnsafeTarget) as caught:
        check_url(url)
    message = str(caught.value)
    assert word in message
    assert message.startswith("webhook_url ")
    # No setting lets a link-local or metadata address through, so none is suggested.
    assert ("never" if word in ("metadata", "link-local") else HINT) in message
    assert "s3cret" not in message


ALWAYS_REFUSED = ("metadata", "link-local")


@pytest.mark.parametrize(
    ("url", "word"), [(u, w) for u, w in REFUSED_URLS if w not in ALWAYS_REFUSED]
)
def test_allow_private_lets_every_private_address_through(url: str, word: str) -> None:
    check_url(url, allow_private=True)


EVERYTHING_ALLOWED = WebhookAllow.parse("0.0.0.0/0, ::/0, localhost")


@pytest.mark.parametrize(
    "url",
    [u for u, w in REFUSED_URLS if w in ALWAYS_REFUSED]
    + [
        "http://[::ffff:169.254.169.254]/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://169.254.0.1/",
        "http://169.254.255.254:8080/",
        "http://[fe80::2]/",
        "http://[febf:ffff::1]/",
        "http://[fd00:ec2::1]/",
        "http://[fd00:ec2:ffff::1]/",
        "http://[64:ff9b::169.254.1.1]/",
    ],
)
def test_link_local_and_metadata_addresses_are_refused_in_every_mode(url: str) -> None:
    for options in (
        {"allow_private": True},
        {"allow": EVERYTHING_ALLOWED},
        {"allow": WebhookAllow.parse("169.254.0.0/16, fe80::/10, fd00::/8")},
    ):
        with pytest.raises(UnsafeTarget) as caught:
            check_url(url, **options)  # type: ignore[arg-type]
        message = str(caught.value)
        assert "metadata" in message or "link-local" in message, message
        assert "never" in message


def test_the_message_shows_what_a_spelling_means() -> None:
    with pytest.raises(UnsafeTarget) as caught:
        check_url("http://0x7f.1/")
    assert str(caught.value) == (
        "webhook_url points at a loopback address (0x7f.1 = 127.0.0.1); "
        "promptq refuses private targets unless PROMPTQ_WEBHOOK_ALLOW_PRIVATE=true, "
        "or the host or its network is in PROMPTQ_WEBHOOK_ALLOW"
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://93.184.216.34/",
        "https://93.184.216.34:8443/hook?token=abc",
        "http://93.184.216.34./",
        "https://[2606:4700::1111]/",
        "https://[2606:4700::1111]:8443/hook",
        "http://[::ffff:93.184.216.34]/",  # IPv4-mapped public address
        "http://[64:ff9b::93.184.216.34]/",  # NAT64 of a public address
        "http://[2002:5db8:d822::1]/",  # 6to4 of a public address
        "http://1.1.1.1/",
        "http://16843009/",  # 1.1.1.1, decimal
        "http://100.63.255.255/",  # just below the shared address space
        "http://100.128.0.1/",  # just above it
        "http://172.32.0.1/",  # just above 172.16.0.0/12
        "https://example.com/hook",
        "https://EXAMPLE.com./hook",
        "https://user:pass@hooks.zapier.com/hooks/catch/1/abc/",
        "https://n8n.example.com/webhook-waiting/123",
        "https://localhost.example.com/",  # "localhost" only as a label of a public name
        "https://example.com:1/",  # any port
    ],
)
def test_public_targets_are_allowed(url: str) -> None:
    check_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/", "http:// or https://"),
        ("javascript:alert(1)", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("gopher://127.0.0.1:6379/_INFO", "http:// or https://"),
        ("example.com/hook", "http:// or https://"),
        ("http:///hook", "no host"),
        ("http://:80/", "no host"),
        ("http://./", "no host"),
        ("http://[::1/", "not a valid URL"),
        ("http://example.com:99999/", "not a valid URL"),
        ("http://exa mple.com/", "not a valid URL"),
        ("http://alice:s3cret@[::1/", "not a valid URL"),
    ],
)
def test_malformed_urls_are_refused_even_when_private_targets_are_allowed(
    url: str, message: str
) -> None:
    for allow_private in (False, True):
        with pytest.raises(UnsafeTarget, match=message) as caught:
            check_url(url, allow_private=allow_private)
        assert "s3cret" not in str(caught.value)
        # The parser's own error quotes the URL; it must not ride along as the context.
        assert caught.value.__context__ is None or caught.value.__suppress_context__


def test_unsafe_target_is_a_value_error() -> None:
    assert issubclass(UnsafeTarget, ValueError)


@pytest.mark.parametrize(
    ("address", "word"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.20.30.40", "private"),
        ("fd00::1", "private"),
        ("169.254.10.10", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("fd00:ec2::254%eth0", "metadata"),
        ("100.100.100.200", "metadata"),
        ("168.63.129.16", "metadata"),
        ("100.64.0.1", "shared address space"),
        ("224.0.0.251", "multicast"),
        ("ff05::2", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("255.255.255.255", "broadcast"),
        ("240.1.2.3", "reserved"),
        ("::ffff:127.0.0.1", "IPv4-mapped"),
        ("64:ff9b::a9fe:a9fe", "metadata"),
        ("64:ff9b::a00:1", "NAT64"),
        ("2002:a00:1::", "6to4"),
        ("::a00:1", "IPv4-compatible"),
    ],
)
def test_is_unsafe_address_names_the_class(address: str, word: str) -> None:
    reason = is_unsafe_address(ipaddress.ip_address(address))
    assert reason is not None
    assert word in reason


@pytest.mark.parametrize(
    "address",
    [
        "93.184.216.34",
        "8.8.8.8",
        "1.1.1.1",
        "2606:4700::1111",
        "2001:4860:4860::8888",
        "::ffff:93.184.216.34",
        "64:ff9b::5db8:d822",
        "2002:5db8:d822::",
    ],
)
def test_public_addresses_are_safe(address: str) -> None:
    assert is_unsafe_address(ipaddress.ip_address(address)) is None


def addrinfo(address: str) -> tuple[Any, ...]:
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 4:
        return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 443))
    return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, 443, 0, 0))


def test_a_name_with_public_and_private_addresses_keeps_only_the_public_ones() -> None:
    # What the sender's connection does with getaddrinfo's answers.
    answers = [addrinfo(a) for a in ("127.0.0.1", "93.184.216.34", "fe80::1%lo", "2606:4700::1")]
    allowed, refused = _sort_addresses(answers, allow_private=False)
    assert [info[4][0] for info in allowed] == ["93.184.216.34", "2606:4700::1"]
    assert refused == ["127.0.0.1 is a loopback address", "fe80::1 is a link-local address"]


def test_a_name_with_only_private_addresses_keeps_none() -> None:
    answers = [addrinfo(a) for a in ("10.0.0.1", "10.0.0.1", "::ffff:192.168.0.1")]
    allowed, refused = _sort_addresses(answers, allow_private=False)
    assert allowed == []
    assert refused[0] == "10.0.0.1 is a private address"
    assert len(refused) == 2  # each address once
    assert "private" in refused[1]


def test_allow_private_keeps_every_address_but_metadata_and_link_local() -> None:
    answers = [
        addrinfo(a)
        for a in ("127.0.0.1", "::1", "169.254.169.254", "::ffff:a9fe:a9fe", "169.254.3.3")
    ]
    allowed, refused = _sort_addresses(answers, allow_private=True)
    assert allowed == answers[:2]
    assert refused[0] == "169.254.169.254 is a cloud metadata address"
    assert "IPv4-mapped" in refused[1]
    assert refused[2] == "169.254.3.3 is a link-local address"


# ---------------------------------------------------------------- PROMPTQ_WEBHOOK_ALLOW


N8N = WebhookAllow.parse("n8n.corp, 10.1.2.0/24,fd12::/16")


@pytest.mark.parametrize(
    "url",
    [
        "http://n8n.corp:5678/webhook/x",
        "http://N8N.corp./hook",
        "http://10.1.2.3/",
        "http://[fd12::5]/",
    ],
)
def test_the_allow_list_lets_its_hosts_and_networks_through(url: str) -> None:
    check_url(url, allow=N8N)


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.3.1/",
        "http://127.0.0.1/",
        "http://redis/",
        "http://[fd13::1]/",
    ],
)
def test_the_allow_list_lets_nothing_else_through(url: str) -> None:
    with pytest.raises(UnsafeTarget) as caught:
        check_url(url, allow=N8N)
    assert "PROMPTQ_WEBHOOK_ALLOW" in str(caught.value)


def test_an_allowed_name_may_resolve_to_a_private_address_but_never_a_link_local_one() -> None:
    """The sender checks the address it connects to: a name on the list may be private,
    another name resolving to the same address may not."""
    answers = [addrinfo(a) for a in ("10.9.9.9", "169.254.169.254", "fe80::1")]
    allowed, refused = _sort_addresses(answers, False, N8N, "n8n.corp")
    assert allowed == answers[:1] and len(refused) == 2
    allowed, refused = _sort_addresses(answers, False, N8N, "other.corp")
    assert allowed == []


@pytest.mark.parametrize("text", ["10.0.0.0/33", "not a host!", "http://x.com"])
def test_a_bad_allow_list_is_refused_naming_the_entry(text: str) -> None:
    with pytest.raises(ValueError, match="neither"):
        WebhookAllow.parse(text)
