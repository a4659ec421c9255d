import json
from pathlib import Path

import yaml
from django.core.management.base import BaseCommand, CommandError

from gatehouse.accounts.models import User
from gatehouse.core.errors import ApplicationError
from gatehouse.registry import selectors
from gatehouse.registry.services.evaluations import evaluations_import


class Command(BaseCommand):
    help = "Import evaluation results (an lm-evaluation-harness results JSON, or a model-index YAML/JSON) into a version."

    def add_arguments(self, parser):
        parser.add_argument("file", type=Path)
        parser.add_argument("--model", required=True, help="ORG/NAME[@REVISION]")
        parser.add_argument("--user", required=True)
        parser.add_argument("--format", choices=["lm-eval", "model-index"], required=True)
        parser.add_argument("--evaluator", default="")
        parser.add_argument("--evaluator-kind", default="internal", choices=["internal", "third-party"])

    def handle(self, *args, file, model, user, format, evaluator, evaluator_kind, **options):
        account = User.objects.filter(username=user).first()
        if account is None:
            raise CommandError(f"no user named {user!r}")
        try:
            text = file.read_text()
            data = json.loads(text) if format == "lm-eval" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise CommandError(f"cannot read {file}: {exc}") from None
        ref, _, revision = model.partition("@")
        try:
            version = selectors.version_get(user=account, repo_id=ref, revision=revision)
            results = evaluations_import(version=version, actor=account, format=format, data=data,
                                         evaluator=evaluator, evaluator_kind=evaluator_kind)
        except ApplicationError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(f"imported {len(results)} evaluation results into {ref}@{version.commit[:12]}")
