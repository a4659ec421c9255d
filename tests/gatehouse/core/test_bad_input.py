"""A NUL character never reaches the database (PostgreSQL cannot hold one in text: each of these answered 500
there): in a URL or a form it is a 400 in the caller's error shape before any view or query runs; in a JSON body, a
400 from the parser; in a cookie, the cookie is ignored."""
import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext


@pytest.mark.parametrize("url, shape", [
    ("/api/v1/models?license=t%00x&page=2", "api"),
    ("/api/v1/models?organization%00=acme", "api"),  # in a parameter's name too
    ("/api/v1/models/acme/m%00", "api"),
    ("/v1/models/acme%2Fm%00", "openai"),
    ("/?q=%00", "text"),  # the model list page
    ("/acme/m%00/resolve/main/config.json", "hub"),  # its clients read X-Error-Message (HEAD has no body)
    ("/api/models/acme/m%00/revision/main", "hub"),
])
def test_a_nul_in_the_url_is_refused_before_any_query(db, token_for, alice, url, shape):
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token_for(alice)}")
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 400 and len(queries) == 0
    assert response["X-Error-Message"].startswith("The request contains a NUL character")
    if shape == "openai":
        assert response.json()["error"]["code"] == "invalid_characters"
        assert response.json()["error"]["type"] == "invalid_request_error"
    elif shape == "hub":
        assert response.json() == {"error": response["X-Error-Message"]}
    elif shape == "api":
        assert response.json()["error"] == {"status": 400, "code": "invalid_characters",
                                            "message": response["X-Error-Message"]}
    else:
        assert response["Content-Type"].startswith("text/plain") and b"remove it" in response.content


def test_a_url_without_nul_is_served_as_before(db, token_for, alice):
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token_for(alice)}")
    assert client.get("/api/v1/models?license=mit%2500").status_code == 200  # an escaped "%00" is just text
    assert client.get("/api/v1/models?q=%C3%A4").status_code == 200


def test_a_nul_in_a_form_is_refused_before_any_query(db, alice):
    client = Client()
    client.force_login(alice)
    with CaptureQueriesContext(connection) as queries:  # as a browser sends a form
        response = client.post("/accounts/tokens", "name=laptop%00&scopes=read",
                               content_type="application/x-www-form-urlencoded")
    assert response.status_code == 400 and b"NUL character" in response.content and len(queries) == 0
    assert not alice.api_tokens.exists()
    login = Client().post("/accounts/login/", {"username": "alice\x00", "password": "x"})  # multipart
    assert login.status_code == 400


def test_a_cookie_with_a_nul_is_ignored_like_an_unknown_session(db):
    client = Client()
    client.cookies["sessionid"] = "abcdefgh\x00xyz"
    assert client.get("/").status_code == 200  # the model list, for an anonymous visitor
    assert client.get("/accounts/tokens").status_code == 302  # to the login page, as without a session


def test_a_nul_in_a_json_body_is_a_400_from_the_parser_and_nothing_is_written(aurora, alice, client_for):
    from gatehouse.registry.models import Dataset

    response = client_for(alice, ("read", "write")).post("/api/v1/datasets", {"organization": "aurora", "name": "corpus",
                                                           "provenance": "synthetic", "description": "a\x00b"},
                                      format="json")
    assert response.status_code == 400 and "NUL character" in response.json()["error"]["message"]
    assert not Dataset.objects.exists()


def test_an_unpaired_surrogate_in_a_json_body_is_a_400_and_nothing_is_written(aurora, alice, client_for):
    from gatehouse.registry.models import Dataset

    # Valid JSON, not text: no database encodes half a UTF-16 pair (psycopg and sqlite3 raised: a 500).
    body = '{"organization": "aurora", "name": "corpus", "provenance": "synthetic", "description": "a\\ud800b"}'
    response = client_for(alice, ("read", "write")).post("/api/v1/datasets", body, content_type="application/json")
    assert response.status_code == 400 and "unpaired surrogate" in response.json()["error"]["message"]
    assert not Dataset.objects.exists()


def test_a_nul_in_a_hub_json_body_is_a_400_in_the_hubs_shape(register, aurora, alice, carol, token_for):
    from releases.models import AccessPolicy, AccessRequest

    model = register(aurora, "gated", alice, tier="open").model
    AccessPolicy.objects.update_or_create(model=model, defaults={"audience": "gated-manual"})
    AccessRequest.objects.create(model=model, user=carol)
    response = Client(HTTP_AUTHORIZATION=f"Bearer {token_for(alice, ('read', 'write', 'admin'))}").post(
        "/api/models/aurora/gated/user-access-request/handle", data='{"user": "carol\\u0000", "status": "accepted"}',
        content_type="application/json")
    assert response.status_code == 400 and "NUL character" in response.json()["error"]
    assert AccessRequest.objects.get().status == "pending"
