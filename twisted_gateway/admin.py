"""
Who may read the operator's pages (``/metrics``, ``/status``) and where.

They name upstream addresses, routes and traffic, so they are never public by
default: with ``[admin] listen`` they are served there only; without it the
public listener serves them to clients in ``admin_allow`` (loopback by
default) and answers 404 to everyone else. The client is the TCP peer, or,
when the peer is one of ``trusted_proxies``, the last address it reports in
``X-Forwarded-For`` that is not itself a trusted proxy (what any client sends
there is never believed on its own).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence, Union

from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from twisted_gateway.schema import DEFAULT_ADMIN_ALLOW as DEFAULT_ADMIN_ALLOW

if TYPE_CHECKING:
    from twisted_gateway.schema import Settings

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: The operator's pages: paths below the gateway's root.
ADMIN_PAGES = (b"/metrics", b"/status", b"/status.json")


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def _within(address: IPAddress | None, networks: Sequence[IPNetwork]) -> bool:
    if address is None:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)


def client_address(peer: str, forwarded_for: Iterable[bytes], trusted: Sequence[IPNetwork]) -> IPAddress | None:
    """
    The client's address for the admin check: the peer, unless the peer is a
    trusted proxy; then the right-most ``X-Forwarded-For`` hop that is not a
    trusted proxy (None if a hop is not an address).
    """
    address = _address(peer)
    if not _within(address, trusted):
        return address
    hops = [h.strip() for v in forwarded_for for h in v.decode("latin-1").split(",") if h.strip()]
    for hop in reversed(hops):
        address = _address(hop)
        if not _within(address, trusted):
            return address
    return address


def is_admin(
    peer: str, forwarded_for: Iterable[bytes], trusted: Sequence[IPNetwork], allow: Sequence[IPNetwork]
) -> bool:
    """Whether a client may read the operator's pages on the public listener."""
    return _within(client_address(peer, forwarded_for, trusted), allow)


def where_served(settings: Settings) -> str:
    """Where the operator's pages are, for the start-up log and ``--check``."""
    admin = settings.admin
    if admin.listen:
        return f"/metrics and /status are served on [admin] listen ({' '.join(admin.listen)}) only"
    allow = " ".join(str(net) for net in admin.admin_allow) or "nobody"
    return (
        f"/metrics and /status are served on the public listener to admin_allow ({allow});"
        " others get 404"
    )


def build_admin_site(pages: Mapping[bytes, IResource]) -> Site:
    """The ``[admin] listen`` site: the operator's pages at its root."""
    root = Resource()
    for name, page in pages.items():
        root.putChild(name, page)
    site = Site(root)
    site.noisy = False
    return site
