from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from gatehouse.accounts.models import Organization, User
from gatehouse.core.errors import ApplicationError
from gatehouse.registry.models import Tier
from gatehouse.registry.services.ingest import files_from_directory, model_version_ingest


class Command(BaseCommand):
    help = "Register a Hugging Face-style model folder as a new version of ORG/NAME (verified by the worker)."

    def add_arguments(self, parser):
        parser.add_argument("directory", type=Path)
        parser.add_argument("--model", required=True, help="ORG/NAME; the organization must exist")
        parser.add_argument("--user", required=True, help="Username of a maintainer of ORG")
        parser.add_argument("--message", default="")
        parser.add_argument("--tier", choices=Tier.values, default=None, help="Tier for a new model (default closed)")

    def handle(self, *args, directory, model, user, message, tier, **options):
        org_slug, _, name = model.partition("/")
        if not name:
            raise CommandError("--model must look like ORG/NAME")
        organization = Organization.objects.filter(slug=org_slug).first()
        if organization is None:
            raise CommandError(f"no organization {org_slug!r}")
        account = User.objects.filter(username=user).first()
        if account is None:
            raise CommandError(f"no user named {user!r}")
        try:
            version = model_version_ingest(organization=organization, name=name, files=files_from_directory(directory),
                                           user=account, message=message, tier=tier)
        except ApplicationError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(f"{model}@{version.commit} registered ({version.files.count()} files, "
                          f"{version.total_bytes} bytes); status {version.status}")
