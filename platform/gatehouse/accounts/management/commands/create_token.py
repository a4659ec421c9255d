from django.core.management.base import BaseCommand, CommandError

from gatehouse.accounts.models import User
from gatehouse.accounts.services import api_token_create, parse_scopes
from gatehouse.core.errors import ApplicationError


class Command(BaseCommand):
    help = "Create an API token for USERNAME and print it once (only its hash is stored)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--scopes", default="read", help="Comma-separated: read,gated-read,inference,write,admin")
        parser.add_argument("--expires", type=int, default=None, metavar="DAYS", help="Expire after DAYS days")
        parser.add_argument("--name", default="cli", help="A label to recognise the token by")

    def handle(self, *args, username, scopes, expires, name, **options):
        user = User.objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no user named {username!r}")
        try:
            issued = api_token_create(user=user, name=name, scopes=parse_scopes(scopes), expires_in_days=expires)
        except ApplicationError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(issued.secret)
