"""Webhooks cannot be used for SSRF: URLs that reach loopback, private, link-local (cloud metadata) or otherwise
non-public addresses are refused when the endpoint is created and again at every delivery (DNS rebinding), and a
delivery connects to the very address it checked.

Nothing here touches the network: `dns` replaces socket.getaddrinfo, and deliveries go through httpx.MockTransport.
"""
import socket

import httpx
import pytest

from gatehouse.audit.models import AuditEvent
from gatehouse.webhooks.admin import WebhookEndpointForm
from gatehouse.webhooks.models import WebhookDelivery, WebhookEndpoint
from gatehouse.webhooks.services import webhook_attempt, webhook_emit
from gatehouse.webhooks.tasks import deliver_webhook_task

PUBLIC = "93.184.215.14"
URL = "/api/v1/organizations/aurora/webhooks"


@pytest.fixture
def dns(monkeypatch):
    """A fake resolver: edit the dict to change answers; an unknown name does not resolve."""
    records = {
        "hooks.example.com": [PUBLIC],
        "v6.example.com": ["2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
        "localhost": ["127.0.0.1", "::1"],
        "internal.example.com": ["10.0.0.5"],
        "metadata.example.com": ["169.254.169.254"],
        "mapped.example.com": ["::ffff:127.0.0.1"],
        "ula.example.com": ["fd12:3456::1"],
        "mixed.example.com": [PUBLIC, "192.168.1.20"],
    }

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if host not in records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0)) if ":" in a
                else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in records[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return records


@pytest.fixture
def receiver():
    """A mock transport standing in for the receiver: records every request, answers with `answer` (200)."""
    sent, answer = [], {"response": httpx.Response(200, text="ok")}

    def handle(request):
        sent.append(request)
        return answer["response"]

    return {"client": httpx.Client(transport=httpx.MockTransport(handle)), "sent": sent, "answer": answer}


@pytest.fixture
def admin(aurora, alice, client_for):
    return client_for(alice, scopes=["admin"])


REFUSED = [
    # scheme, credentials, shape
    ("ftp://hooks.example.com/in", "ftp: URLs cannot receive webhooks"),
    ("file:///etc/passwd", "file: URLs cannot receive webhooks"),
    ("gopher://hooks.example.com:70/_x", "gopher: URLs cannot receive webhooks"),
    ("hooks.example.com/in", "without http:// or https://"),
    ("https://user:secret@hooks.example.com/in", "contains a user name or password"),
    ("https://token@hooks.example.com/in", "contains a user name or password"),
    ("http:///in", "has no host"),
    ("http://hooks.example.com:70000/in", "port 70000 does not exist"),
    ("http://exa mple.com/in", "is not a valid URL"),
    # IPv4 literals
    ("http://127.0.0.1:8000/in", "127.0.0.1 is a loopback address"),
    ("http://10.1.2.3/in", "10.1.2.3 is a private address"),
    ("http://172.16.0.1/in", "172.16.0.1 is a private address"),
    ("http://192.168.0.10/in", "192.168.0.10 is a private address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("http://100.64.0.1/in", "100.64.0.1 is a shared carrier-grade NAT address"),
    ("http://224.0.0.1/in", "224.0.0.1 is a multicast address"),
    ("http://240.0.0.1/in", "240.0.0.1 is a reserved address"),
    ("http://0.0.0.0:8000/in", "0.0.0.0 is an unspecified address"),
    # odd IPv4 spellings the C resolver reads as 127.0.0.1
    ("http://2130706433/in", "2130706433 is an unusual spelling of the IPv4 address 127.0.0.1"),
    ("http://0177.0.0.1/in", "0177.0.0.1 is an unusual spelling of the IPv4 address 127.0.0.1"),
    ("http://0x7f.1/in", "0x7f.1 is an unusual spelling of the IPv4 address 127.0.0.1"),
    ("http://127.1/in", "127.1 is an unusual spelling of the IPv4 address 127.0.0.1"),
    ("http://0x5db8d70e/in", "unusual spelling of the IPv4 address 93.184.215.14"),  # even a public one
    # IPv6 literals
    ("http://[::1]/in", "::1 is a loopback address"),
    ("http://[::]/in", ":: is an unspecified address"),
    ("http://[fd00::1]/in", "fd00::1 is a unique local (private) address"),
    ("http://[fe80::1]/in", "fe80::1 is a link-local address"),
    ("http://[ff02::1]/in", "ff02::1 is a multicast address"),
    ("http://[::ffff:127.0.0.1]/in", "::ffff:127.0.0.1 is an IPv6 form of 127.0.0.1, a loopback address"),
    ("http://[::ffff:169.254.169.254]/in", "an IPv6 form of 169.254.169.254, a link-local address"),
    ("http://[2002:a00:1::]/in", "an IPv6 form of 10.0.0.1, a private address"),  # 6to4
    ("http://[64:ff9b::a9fe:a9fe]/in", "an IPv6 form of 169.254.169.254, a link-local address"),  # NAT64
    # names
    ("http://localhost:8000/in", "localhost resolves to 127.0.0.1, a loopback address"),
    ("https://internal.example.com/in", "internal.example.com resolves to 10.0.0.5, a private address"),
    ("https://metadata.example.com/in", "metadata.example.com resolves to 169.254.169.254, a link-local address"),
    ("https://mapped.example.com/in", "an IPv6 form of 127.0.0.1, a loopback address"),
    ("https://ula.example.com/in", "fd12:3456::1, a unique local (private) address"),
    ("https://mixed.example.com/in", "mixed.example.com resolves to 192.168.1.20, a private address"),
    ("https://nowhere.example.com/in", "nowhere.example.com does not resolve"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED, ids=[url for url, _ in REFUSED])
def test_refused_urls_are_a_400_that_says_why_and_writes_nothing(admin, dns, url, reason):
    audited = AuditEvent.objects.count()  # the admin's token creation is audited too
    response = admin.post(URL, {"url": url}, format="json")
    assert response.status_code == 400, response.json()
    error = response.json()["error"]
    assert error["message"].startswith("url is refused: ") and reason in error["message"]
    assert error["fields"]["url"] == [error["message"]]
    assert WebhookEndpoint.objects.count() == 0 and AuditEvent.objects.count() == audited


def test_the_message_says_what_to_do(admin, dns):
    private = admin.post(URL, {"url": "https://internal.example.com/in"}, format="json").json()["error"]["message"]
    assert "give the receiver's public URL" in private and "GATEHOUSE_WEBHOOK_ALLOW_PRIVATE_URLS" in private
    metadata = admin.post(URL, {"url": "http://169.254.169.254/"}, format="json").json()["error"]["message"]
    assert "never delivers webhooks there" in metadata and "ALLOW_PRIVATE" not in metadata
    spelled = admin.post(URL, {"url": "http://0x7f.1/"}, format="json").json()["error"]["message"]
    assert "four decimal numbers (a.b.c.d)" in spelled
    missing = admin.post(URL, {"url": "https://nowhere.example.com/"}, format="json").json()["error"]["message"]
    assert "Check the host name, or create its DNS record first" in missing


@pytest.mark.parametrize("url", ["https://hooks.example.com/gatehouse", "http://hooks.example.com:8080/in?x=1",
                                 "https://v6.example.com/in", f"https://{PUBLIC}/in",
                                 "https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/in"])
def test_public_urls_are_accepted_and_audited(admin, dns, url):
    audited = AuditEvent.objects.count()
    response = admin.post(URL, {"url": url, "events": ["release.downgraded"]}, format="json")
    assert response.status_code == 201, response.json()
    endpoint = WebhookEndpoint.objects.get()
    assert (endpoint.url, endpoint.events, response.json()["url"]) == (url, ["release.downgraded"], url)
    assert list(AuditEvent.objects.order_by("id").values_list("action", "target_id"))[audited:] == [
        ("webhook.create", str(endpoint.pk))]


def test_the_allow_private_setting_admits_on_premises_receivers_but_never_metadata(admin, dns, settings):
    settings.WEBHOOK_ALLOW_PRIVATE_URLS = True
    for url in ("https://internal.example.com/in", "http://localhost:8000/in", "http://192.168.0.10/in",
                "http://[fd00::1]/in", "http://100.64.0.1/in"):
        assert admin.post(URL, {"url": url}, format="json").status_code == 201, url
    for url in ("http://169.254.169.254/latest/meta-data/", "https://metadata.example.com/", "http://[fe80::1]/",
                "http://0.0.0.0/", "http://224.0.0.1/", "http://2130706433/", "https://u:p@internal.example.com/"):
        assert admin.post(URL, {"url": url}, format="json").status_code == 400, url
    assert WebhookEndpoint.objects.count() == 5


def test_the_admin_site_gets_the_same_checks(aurora, dns):
    form = WebhookEndpointForm(data={"organization": aurora.pk, "url": "http://169.254.169.254/latest/meta-data/",
                                     "secret": "s", "events": '["*"]', "is_active": True,
                                     "created_at": "2024-01-01 00:00:00"})
    assert not form.is_valid() and "link-local" in form.errors["url"][0]


def _delivery(org):
    return webhook_emit(organization=org, event="release.downgraded", data={"model": "aurora/m"})[0]


def test_dns_rebinding_is_refused_at_delivery_and_not_retried(admin, aurora, dns, receiver):
    assert admin.post(URL, {"url": "https://hooks.example.com/in"}, format="json").status_code == 201
    dns["hooks.example.com"] = ["10.0.0.5"]  # the attacker's DNS now answers with an internal address
    delivery, retry = webhook_attempt(delivery_id=_delivery(aurora).pk, client=receiver["client"])
    assert receiver["sent"] == []
    assert (delivery.status, delivery.attempts, retry, delivery.last_status_code, delivery.next_attempt_at) == (
        "failed", 1, None, None, None)
    assert delivery.last_error == "refused: hooks.example.com resolves to 10.0.0.5, a private address"


def test_one_private_address_among_public_ones_is_enough_to_refuse(aurora, dns, receiver):
    WebhookEndpoint.objects.create(organization=aurora, url="https://hooks.example.com/in", secret="s", events=["*"])
    dns["hooks.example.com"] = [PUBLIC, "127.0.0.1"]
    delivery, retry = webhook_attempt(delivery_id=_delivery(aurora).pk, client=receiver["client"])
    assert receiver["sent"] == [] and delivery.status == "failed" and retry is None
    assert delivery.last_error == "refused: hooks.example.com resolves to 127.0.0.1, a loopback address"


def test_a_refused_delivery_through_the_task_is_given_up_at_once(aurora, dns, receiver, monkeypatch):
    """Endpoints stored before these checks existed (or written around the API) are refused at delivery too."""
    WebhookEndpoint.objects.create(organization=aurora, url="http://169.254.169.254/latest/meta-data/", secret="s",
                                   events=["*"])
    monkeypatch.setattr(httpx, "post", lambda *a, **k: pytest.fail("a refused delivery must not be sent"))
    monkeypatch.setattr(httpx, "Client", lambda *a, **k: pytest.fail("a refused delivery must not be sent"))
    delivery = _delivery(aurora)
    deliver_webhook_task.delay(delivery.pk)  # eager: a retry would run right here, attempts would grow
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("failed", 1)
    assert delivery.last_error.startswith("refused: 169.254.169.254 is a link-local address")


def test_stored_urls_with_credentials_or_other_schemes_are_refused_at_delivery(aurora, dns, receiver):
    for url in ("https://user:pw@hooks.example.com/in", "ftp://hooks.example.com/in"):
        WebhookEndpoint.objects.create(organization=aurora, url=url, secret="s", events=["*"])
    deliveries = webhook_emit(organization=aurora, event="x", data={})
    errors = sorted(webhook_attempt(delivery_id=d.pk, client=receiver["client"])[0].last_error for d in deliveries)
    assert errors == ["refused: ftp: URLs cannot receive webhooks", "refused: the URL contains a user name or password"]
    assert receiver["sent"] == [] and set(WebhookDelivery.objects.values_list("status", flat=True)) == {"failed"}


def test_a_name_that_stops_resolving_is_retried_like_a_network_error(aurora, dns, receiver):
    WebhookEndpoint.objects.create(organization=aurora, url="https://hooks.example.com/in", secret="s", events=["*"])
    del dns["hooks.example.com"]
    delivery, retry = webhook_attempt(delivery_id=_delivery(aurora).pk, client=receiver["client"])
    assert (delivery.status, retry, receiver["sent"]) == ("pending", 10, [])
    assert delivery.last_error.startswith("DNS lookup failed: hooks.example.com does not resolve")


def test_https_delivery_is_pinned_to_the_checked_address_with_the_name_as_host_and_sni(aurora, dns, receiver):
    WebhookEndpoint.objects.create(organization=aurora, url="https://hooks.example.com:8443/in?x=1", secret="s",
                                   events=["*"])
    delivery, retry = webhook_attempt(delivery_id=_delivery(aurora).pk, client=receiver["client"])
    assert (delivery.status, retry) == ("delivered", None)
    [request] = receiver["sent"]
    assert str(request.url) == f"https://{PUBLIC}:8443/in?x=1"
    assert request.headers["Host"] == "hooks.example.com:8443"
    assert request.extensions["sni_hostname"] == "hooks.example.com"  # TLS verifies the certificate for the name
    assert request.headers["X-Gatehouse-Event"] == "release.downgraded"


def test_http_and_ipv6_deliveries_are_pinned_too(aurora, dns, receiver):
    WebhookEndpoint.objects.create(organization=aurora, url="http://hooks.example.com/in", secret="s", events=["*"])
    WebhookEndpoint.objects.create(organization=aurora, url="https://v6.example.com/in", secret="s", events=["*"])
    for delivery in webhook_emit(organization=aurora, event="x", data={}):
        assert webhook_attempt(delivery_id=delivery.pk, client=receiver["client"])[0].status == "delivered"
    by_host = {r.headers["Host"]: r for r in receiver["sent"]}
    assert str(by_host["hooks.example.com"].url) == f"http://{PUBLIC}/in"
    assert "sni_hostname" not in by_host["hooks.example.com"].extensions
    assert str(by_host["v6.example.com"].url) == "https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/in"
    assert by_host["v6.example.com"].extensions["sni_hostname"] == "v6.example.com"


def test_redirects_are_not_followed_even_by_a_client_that_would(aurora, dns):
    sent = []

    def handle(request):
        sent.append(request)
        return httpx.Response(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})

    client = httpx.Client(transport=httpx.MockTransport(handle), follow_redirects=True)
    WebhookEndpoint.objects.create(organization=aurora, url="https://hooks.example.com/in", secret="s", events=["*"])
    delivery, retry = webhook_attempt(delivery_id=_delivery(aurora).pk, client=client)
    assert [str(r.url) for r in sent] == [f"https://{PUBLIC}/in"]
    assert (delivery.status, delivery.last_status_code, retry) == ("pending", 302, 10)
    assert delivery.last_error.startswith("HTTP 302")


def test_the_default_client_ignores_proxies_and_redirects(aurora, dns, monkeypatch):
    """Without a client passed in, webhook_attempt builds its own: direct connections (a proxy would resolve the
    name itself, undoing the pin) and no redirects."""
    made, sent = [], []
    real_client = httpx.Client

    def client(**kwargs):
        made.append(kwargs)
        return real_client(transport=httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(204)), **kwargs)

    monkeypatch.setattr(httpx, "Client", client)
    WebhookEndpoint.objects.create(organization=aurora, url="https://hooks.example.com/in", secret="s", events=["*"])
    delivery, _ = webhook_attempt(delivery_id=_delivery(aurora).pk)
    assert delivery.status == "delivered" and made == [{"trust_env": False}]
    assert str(sent[0].url) == f"https://{PUBLIC}/in" and sent[0].headers["Host"] == "hooks.example.com"


def test_a_refused_connection_falls_back_to_the_next_checked_address(aurora, dns):
    sent = []

    def handle(request):
        sent.append(str(request.url))
        if request.url.host == PUBLIC:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200)

    dns["hooks.example.com"] = [PUBLIC, "93.184.215.15"]
    WebhookEndpoint.objects.create(organization=aurora, url="https://hooks.example.com/in", secret="s", events=["*"])
    client = httpx.Client(transport=httpx.MockTransport(handle))
    delivery, _ = webhook_attempt(delivery_id=_delivery(aurora).pk, client=client)
    assert delivery.status == "delivered" and sent == [f"https://{PUBLIC}/in", "https://93.184.215.15/in"]
