"""Where webhooks may be sent (SSRF defence).

Organization admins type webhook URLs and Gatehouse's own servers post to them, from inside our network. Without
these checks a webhook would make our workers call the cloud metadata service (169.254.169.254), an admin console
on localhost or a database on the private network. So a URL must be http(s), carry no credentials, and its host
must be (or resolve to) only public unicast addresses.

The check runs twice: when the endpoint is created (a clear 400), and again before every delivery, because the
name's DNS answer may have changed since (DNS rebinding). The delivery then connects to the very address that was
checked (`delivery_targets`), so a second, different DNS answer between check and connect cannot slip through.

Parsing uses httpx.URL, the parser of the client that delivers, so the checker and the connector cannot disagree
about which host a URL names.
"""
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOW_PRIVATE_HINT = ("Gatehouse delivers webhooks only to public addresses: give the receiver's public URL "
                      "(an on-premises installation can allow private receivers with "
                      "GATEHOUSE_WEBHOOK_ALLOW_PRIVATE_URLS).")
NEVER_HINT = "Gatehouse never delivers webhooks there: give the receiver's public URL."
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UrlRefused(Exception):
    """This URL may never be delivered to: retrying won't help."""

    def __init__(self, reason: str, advice: str):
        super().__init__(reason)
        self.reason = reason  # what is wrong, short enough for a delivery's last_error
        self.advice = advice  # what to do about it, for the person creating the endpoint


class UrlUnresolved(Exception):
    """The host name has no address right now (maybe only for now: DNS outages pass)."""


@dataclass(frozen=True)
class Target:
    url: str  # the URL with the checked address in place of the name: where the connection goes
    host: str  # the Host header: the name (and port) the receiver expects
    sni_hostname: str | None  # https to a name: TLS sends and verifies the certificate against the name, not the IP


def address_kind(ip: IPAddress) -> tuple[str, bool] | None:
    """Why `ip` is not a public unicast address, and whether WEBHOOK_ALLOW_PRIVATE_URLS may allow it; None if public.

    Link-local (cloud metadata), multicast, unspecified and reserved addresses are never a receiver, even on-premises.
    """
    if ip.version == 6:
        # IPv6 forms that carry an IPv4 address reach that IPv4 address: judge the address inside.
        embedded = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None:
            kind = address_kind(embedded)
            return kind and (f"an IPv6 form of {embedded}, {kind[0]}", kind[1])
    if ip.is_unspecified:
        return "an unspecified address", False
    if ip.is_loopback:
        return "a loopback address", True
    if ip.is_link_local:
        return "a link-local address (where cloud metadata services live)", False
    if ip.is_multicast:
        return "a multicast address", False
    if ip in _CGNAT:
        return "a shared carrier-grade NAT address", True
    if ip.version == 6 and ip in _UNIQUE_LOCAL:
        return "a unique local (private) address", True
    if ip.is_reserved:
        return "a reserved address", False
    if ip.is_private:
        return "a private address", True
    if not ip.is_global:
        return "a non-public address", True
    return None


def _parse(url: str) -> httpx.URL:
    example = "Give a full URL such as https://hooks.example.com/gatehouse."
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        try:
            host = urlsplit(url).hostname or ""
        except ValueError:
            host = ""
        _literal(host)  # httpx refuses '0177.0.0.1' too: say why in our words
        raise UrlRefused(f"{url!r} is not a valid URL ({exc})", example) from None
    if parsed.scheme not in ("http", "https"):
        what = f"{parsed.scheme}: URLs" if parsed.scheme else "URLs without http:// or https://"
        raise UrlRefused(f"{what} cannot receive webhooks", "Give an http:// or, better, https:// URL.")
    if parsed.userinfo:
        raise UrlRefused("the URL contains a user name or password",
                         "Remove the 'user:password@' part: receivers authenticate Gatehouse by the "
                         "X-Gatehouse-Signature header, and credentials in URLs end up in logs.")
    if not parsed.host:
        raise UrlRefused("the URL has no host", example)
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise UrlRefused(f"port {parsed.port} does not exist", "Give a port from 1 to 65535, or none for the default.")
    return parsed


def _literal(host: str) -> IPAddress | None:
    """The address if `host` is an IP literal; UrlRefused for IPv4 spelled any other way than a.b.c.d."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        # The C resolver reads '2130706433', '0177.0.0.1', '0x7f.1' and '127.1' as 127.0.0.1: such spellings
        # exist to slip past checks, so none is accepted, whatever the address.
        packed = socket.inet_aton(host)
    except OSError:
        return None
    raise UrlRefused(f"{host} is an unusual spelling of the IPv4 address {ipaddress.IPv4Address(packed)}",
                     "Write IPv4 addresses as four decimal numbers (a.b.c.d), or better, use a host name.")


def _refuse_unless_public(host: str, ip: IPAddress, *, literal: bool, allow_private: bool) -> None:
    kind = address_kind(ip)
    if kind is None or (kind[1] and allow_private):
        return
    where = f"{host} is" if literal else f"{host} resolves to {ip},"
    advice = ALLOW_PRIVATE_HINT if kind[1] else NEVER_HINT
    raise UrlRefused(f"{where} {kind[0]}", advice)


def _checked_addresses(parsed: httpx.URL, *, allow_private: bool) -> tuple[list[IPAddress], bool]:
    """Every address the host stands for, each checked; and whether the host was an IP literal."""
    host = parsed.host
    literal = _literal(host)
    if literal is not None:
        _refuse_unless_public(host, literal, literal=True, allow_private=allow_private)
        return [literal], True
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        # raw_host is the IDNA (ASCII) form httpx would connect to.
        answers = socket.getaddrinfo(parsed.raw_host.decode("ascii"), port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlUnresolved(f"{host} does not resolve ({exc})") from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canonname, sockaddr in answers:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise UrlUnresolved(f"{host} does not resolve (no addresses)")
    # Every address, not only the first: a client may try any of them, and a rebinding attacker needs only one.
    for ip in addresses:
        _refuse_unless_public(host, ip, literal=False, allow_private=allow_private)
    return addresses, False


def webhook_url_check(url: str, *, allow_private: bool) -> None:
    """At creation: UrlRefused (never deliverable) or UrlUnresolved (no address), else the URL may be stored."""
    parsed = _parse(url)
    _literal(parsed.host)  # the spelling first: URLValidator would only say "Enter a valid URL."
    try:
        URLValidator(schemes=["http", "https"])(url)
    except ValidationError:
        raise UrlRefused(f"{url!r} is not a valid URL",
                         "Give a full URL such as https://hooks.example.com/gatehouse.") from None
    _checked_addresses(parsed, allow_private=allow_private)


def delivery_targets(url: str, *, allow_private: bool) -> list[Target]:
    """At delivery: resolve again, check every address, and return one pinned target per address, in the
    resolver's order (a caller tries the next one when a connection is refused, as a client would by name)."""
    parsed = _parse(url)
    addresses, literal = _checked_addresses(parsed, allow_private=allow_private)
    host = parsed.netloc.decode("ascii")
    sni = None if literal or parsed.scheme != "https" else parsed.raw_host.decode("ascii")
    return [Target(url=str(parsed.copy_with(host=str(ip))), host=host, sni_hostname=sni) for ip in addresses]
