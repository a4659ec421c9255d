"""Run inside `manage.py shell` by test_hub_clients.py: people, tokens and one model per tier, each a copy
of the folder named by HUB_SETUP_FOLDER. Prints the tokens as JSON."""
import json
import os
from pathlib import Path

from gatehouse.accounts.models import Membership, Organization, User
from gatehouse.accounts.services import api_token_create
from gatehouse.registry.services.ingest import files_from_directory, model_version_ingest
from gatehouse.registry.services.versions import model_version_verify
from releases.models import AccessPolicy

folder = Path(os.environ["HUB_SETUP_FOLDER"])
alice = User.objects.create_user("alice", "alice@example.com", "pw")
carol = User.objects.create_user("carol", "carol@example.org", "pw")
dave = User.objects.create_user("dave", "dave@example.org", "pw")
aurora = Organization.objects.create(slug="aurora", name="Aurora")
Membership.objects.create(user=alice, organization=aurora, role=Membership.Role.ADMIN)
for name, tier, audience in [("tiny-open", "open", "public"), ("tiny-gated", "open", "gated-manual"),
                             ("tiny-secret", "closed", "organization"), ("tiny-served", "api", "public")]:
    version = model_version_ingest(organization=aurora, name=name, files=files_from_directory(folder), user=alice,
                                   tier=tier)
    model_version_verify(version_id=version.pk)
    AccessPolicy.objects.create(model=version.model, audience=audience)
tokens = {
    "alice": api_token_create(user=alice, name="e2e", scopes=["read", "gated-read", "write"]).secret,
    "carol": api_token_create(user=carol, name="e2e", scopes=["read", "gated-read"]).secret,
    "dave": api_token_create(user=dave, name="e2e", scopes=["read", "gated-read"]).secret,
}
print("TOKENS " + json.dumps(tokens))
