"""Fetch policy shared by the HTTP and replay fetchers: the SSRF address guard, robots.txt, opt-out headers."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.robotparser import RobotFileParser

BLOCKED_ADDRESS = "fetch.blocked_address"
ROBOTS = "fetch.robots"
OPT_OUT = "fetch.opt_out"

# Public addresses that still reach a cloud provider's instance services: Azure's wire server and
# Alibaba Cloud's metadata (the link-local 169.254.169.254 and fd00:ec2::254 are caught by class already).
_METADATA = frozenset(ipaddress.ip_address(a) for a in ("168.63.129.16", "100.100.100.200", "fd00:ec2::254"))
# X-Robots-Tag directives that withhold an image from a training set (noai/noimageai: the opt-out
# convention of DeviantArt and others; noindex/noimageindex: search-engine exclusion, taken as a no too).
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
_KNOWN_DIRECTIVES = OPT_OUT_DIRECTIVES | {"all", "none", "nofollow", "noarchive", "nosnippet", "notranslate",
                                          "unavailable_after", "max-snippet", "max-image-preview",
                                          "max-video-preview", "indexifembedded"}


class AddressGuard:
    """Says whether an address may be connected to: public unicast only, unless an allow-list covers it."""

    def __init__(self, enabled: bool = True, allow: Iterable[str] = ()):
        self.enabled = enabled
        # ip_network() raises on a typo here, not on every URL of a shard later.
        self._allow = tuple(ipaddress.ip_network(n, strict=False) for n in allow)

    def why_blocked(self, address: str) -> str | None:
        """None when `address` (a literal IP) may be reached, else a short reason."""
        if not self.enabled:
            return None
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # a zone id (fe80::1%eth0) says nothing here
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 reaches 10.0.0.1
        if any(ip in net for net in self._allow):
            return None
        if ip in _METADATA:
            return f"{ip} is a cloud metadata address"
        for label, hit in (("loopback", ip.is_loopback), ("private", ip.is_private), ("link-local", ip.is_link_local),
                           ("multicast", ip.is_multicast), ("unspecified", ip.is_unspecified),
                           ("reserved", ip.is_reserved), ("non-global", not ip.is_global)):
            if hit:
                return f"{ip} is a {label} address"
        return None


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def robots_agent(user_agent: str) -> str:
    """The product token robots.txt groups are matched against: 'danqing' of 'danqing/0.1 (...)'."""
    return user_agent.split("/", 1)[0].split(" ", 1)[0] or "*"


class Robots:
    """One host's parsed robots.txt (RFC 9309 outcomes: a 4xx allows all, a 5xx disallows all)."""

    def __init__(self, status: int | None, body: bytes | None):
        self.status = status
        self._parser: RobotFileParser | None = None
        self._disallow_all = status is not None and status >= 500
        if status is not None and 200 <= status < 300 and body is not None:
            parser = RobotFileParser()
            parser.parse(body.decode("utf-8", "replace").splitlines())
            self._parser = parser

    def allows(self, agent: str, url: str) -> bool:
        if self._disallow_all:
            return False
        return self._parser is None or self._parser.can_fetch(agent, url)


def robots_url(scheme: str, host: str, port: int | None) -> str:
    default = {"http": 80, "https": 443}.get(scheme)
    netloc = f"[{host}]" if ":" in host else host
    return f"{scheme}://{netloc}{'' if port in (None, default) else f':{port}'}/robots.txt"


def opted_out(headers: dict[str, str], agent: str) -> str | None:
    """The opt-out directive in an X-Robots-Tag header (lower-case names) that applies to `agent`, or None.

    A value is a comma list of directives, each group optionally scoped to one crawler ("otherbot: noai"):
    a scope names the directives up to the next scope, and only ours or an unscoped one applies.
    """
    value = headers.get("x-robots-tag")
    if not value:
        return None
    ours = agent.lower()
    scope: str | None = None
    for part in value.split(","):
        token = part.strip().lower()
        if ":" in token:
            head, rest = (s.strip() for s in token.split(":", 1))
            if head not in _KNOWN_DIRECTIVES:  # "agent: directive" opens a scope; "max-snippet: 5" does not
                scope, token = head, rest
        if token in OPT_OUT_DIRECTIVES and scope in (None, ours, "*"):
            return token
    return None
