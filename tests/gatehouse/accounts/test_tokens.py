from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from gatehouse.accounts.models import ApiToken
from gatehouse.accounts.services import api_token_create, token_hash
from gatehouse.audit.models import AuditEvent


def test_token_is_stored_hashed_and_shown_once(alice):
    issued = api_token_create(user=alice, name="ci", scopes=["read", "write"])
    token = ApiToken.objects.get()
    assert issued.secret.startswith("gh_")
    assert token.key_hash == token_hash(issued.secret)
    assert issued.secret not in str(token.__dict__)
    assert token.scopes == ["read", "write"]
    assert AuditEvent.objects.get().action == "token.create"


def test_create_token_command_prints_a_working_token(alice, capsys, client):
    call_command("create_token", "alice", "--scopes", "read,gated-read,inference", "--expires", "30")
    secret = capsys.readouterr().out.strip()
    token = ApiToken.objects.get()
    assert token.scopes == ["read", "gated-read", "inference"]
    assert timedelta(days=29, hours=23) < token.expires_at - timezone.now() <= timedelta(days=30)
    response = client.get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert response.status_code == 200
    assert response.json()["username"] == "alice"
    assert response.json()["token"]["scopes"] == ["gated-read", "inference", "read"]


@pytest.mark.parametrize("args, message", [
    (["nobody", "--scopes", "read"], "no user named 'nobody'"),
    (["alice", "--scopes", "read,superpower"], "Unknown scope(s) superpower"),
    (["alice", "--scopes", ""], "Give at least one scope"),
    (["alice", "--expires", "0"], "Expiry must be a positive number of days."),
])
def test_create_token_command_refuses_bad_input(alice, args, message):
    with pytest.raises(CommandError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call_command("create_token", *args)
    assert ApiToken.objects.count() == 0


def test_invalid_expired_and_revoked_tokens_get_401_with_a_reason(alice, client):
    expired = api_token_create(user=alice, name="old", scopes=["read"])
    ApiToken.objects.filter(pk=expired.token.pk).update(expires_at=timezone.now() - timedelta(days=1))
    revoked = api_token_create(user=alice, name="gone", scopes=["read"])
    ApiToken.objects.filter(pk=revoked.token.pk).update(revoked_at=timezone.now())
    cases = {"gh_not-a-real-token": "Invalid token", expired.secret: "expired", revoked.secret: "was revoked"}
    for secret, reason in cases.items():
        response = client.get("/api/v1/models", HTTP_AUTHORIZATION=f"Bearer {secret}")
        assert response.status_code == 401
        assert response["WWW-Authenticate"] == 'Bearer realm="gatehouse"'
        assert reason in response.json()["error"]["message"]


def test_last_use_is_recorded(alice, client):
    issued = api_token_create(user=alice, name="t", scopes=["read"])
    assert issued.token.last_used_at is None
    client.get("/api/v1/models", HTTP_AUTHORIZATION=f"Bearer {issued.secret}")
    assert ApiToken.objects.get().last_used_at is not None


def test_token_api_needs_admin_scope_and_revokes(alice, client_for, client):
    reader = client_for(alice, scopes=["read"])
    response = reader.post("/api/v1/tokens", {"name": "x", "scopes": ["read"]}, format="json")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "missing_scope"
    assert ApiToken.objects.count() == 1  # only the reader's own token

    admin = client_for(alice, scopes=["admin"])
    created = admin.post("/api/v1/tokens", {"name": "deploy", "scopes": ["inference"]}, format="json")
    assert created.status_code == 201
    secret = created.json()["token"]
    me = client.get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert me.status_code == 200
    assert me.json()["token"]["scopes"] == ["inference"]

    assert admin.delete(f"/api/v1/tokens/{created.json()['id']}").status_code == 204
    response = client.get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert response.status_code == 401
    assert "was revoked" in response.json()["error"]["message"]


def test_tokens_of_others_cannot_be_revoked(alice, carol, client_for):
    alices = api_token_create(user=alice, name="mine", scopes=["read"])
    response = client_for(carol, scopes=["admin"]).delete(f"/api/v1/tokens/{alices.token.pk}")
    assert response.status_code == 404
    assert ApiToken.objects.get(pk=alices.token.pk).revoked_at is None
