"""A NUL character in a URL is a 400 in the caller's error shape, before any view or query runs (PostgreSQL cannot
hold NUL in text: these answered 500 there)."""
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
    ("/acme/m%00/resolve/main/config.json", "api"),  # the Hub's path: its clients read X-Error-Message
])
def test_a_nul_in_the_url_is_refused_before_any_query(db, token_for, alice, url, shape):
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token_for(alice)}")
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 400 and len(queries) == 0
    assert response["X-Error-Message"].startswith("The URL contains a NUL character")
    if shape == "openai":
        assert response.json()["error"]["code"] == "invalid_characters"
        assert response.json()["error"]["type"] == "invalid_request_error"
    elif shape == "api":
        assert response.json()["error"] == {"status": 400, "code": "invalid_characters",
                                            "message": response["X-Error-Message"]}
    else:
        assert response["Content-Type"].startswith("text/plain") and b"remove it" in response.content


def test_a_url_without_nul_is_served_as_before(db, token_for, alice):
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token_for(alice)}")
    assert client.get("/api/v1/models?license=mit%2500").status_code == 200  # an escaped "%00" is just text
    assert client.get("/api/v1/models?q=%C3%A4").status_code == 200
