from django.core.management.base import BaseCommand, CommandError

from gatehouse.accounts.models import Organization, User
from gatehouse.core.errors import ApplicationError
from gatehouse.registry import selectors
from gatehouse.registry.models import DatasetVersion
from gatehouse.registry.services.training import training_run_create, training_run_execute


class Command(BaseCommand):
    help = ("Launch a training run: --dataset ORG/NAME@VERSION[:WEIGHT] (repeatable), a preset or --base for a "
            "fine-tune, and a budget. Queued for a worker, or run here with --wait.")

    def add_arguments(self, parser):
        parser.add_argument("--model", required=True, help="ORG/NAME of the model the run registers a version of")
        parser.add_argument("--user", required=True)
        parser.add_argument("--dataset", action="append", required=True, dest="datasets")
        parser.add_argument("--preset", default="debug")
        parser.add_argument("--method", default="full", choices=["full", "lora", "last-layer", "bias"])
        parser.add_argument("--base", help="ORG/NAME[@REVISION] to fine-tune")
        parser.add_argument("--max-steps", type=int)
        parser.add_argument("--token-budget", type=int)
        parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                            help="a trainer option, e.g. seq_len=128 (repeatable)")
        parser.add_argument("--tier", default="closed", choices=["closed", "api", "open"])
        parser.add_argument("--processes", type=int, default=1)
        parser.add_argument("--license", default="", help="default: the base's, or the one all datasets share")
        parser.add_argument("--wait", action="store_true", help="run it in this process instead of a worker")

    def handle(self, *args, **o):
        org_slug, _, name = o["model"].partition("/")
        organization = Organization.objects.filter(slug=org_slug).first()
        user = User.objects.filter(username=o["user"]).first()
        if organization is None or not name:
            raise CommandError(f"--model must name an existing organization: ORG/NAME, not {o['model']!r}")
        if user is None:
            raise CommandError(f"no user named {o['user']!r}")
        try:
            run = training_run_create(
                organization=organization, model_name=name, actor=user, datasets=self._datasets(o["datasets"]),
                preset_name=o["preset"], method=o["method"], base_version=self._base(o["base"], user),
                max_steps=o["max_steps"], token_budget=o["token_budget"], options=self._options(o["option"]),
                tier=o["tier"], processes=o["processes"], license=o["license"])
        except ApplicationError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(f"training run {run.pk} queued: ~{run.estimated_flops:.3g} FLOP"
                          + (f", expected designations: {', '.join(run.expected_designations)}"
                             if run.expected_designations else ""))
        if o["wait"]:
            run = training_run_execute(run_id=run.pk, attempt=run.attempt)
            self.stdout.write(f"training run {run.pk} {run.status}"
                              + (f": {run.result_version.commit}" if run.result_version_id else "")
                              + (f": {run.error}" if run.error else ""))
            if run.status != "succeeded":
                raise CommandError(f"training run {run.pk} {run.status}")

    def _datasets(self, specs):
        chosen = []
        for spec in specs:
            ref, _, weight = spec.partition(":")
            dataset_id, _, version = ref.partition("@")
            org, _, name = dataset_id.partition("/")
            row = DatasetVersion.objects.filter(dataset__organization__slug=org, dataset__name=name,
                                                version=version).first()
            if row is None:
                raise CommandError(f"no dataset version {ref!r} (give ORG/NAME@VERSION)")
            try:
                chosen.append((row, float(weight) if weight else 1.0))
            except ValueError:
                raise CommandError(f"weight in {spec!r} is not a number") from None
        return chosen

    def _base(self, spec, user):
        if not spec:
            return None
        ref, _, revision = spec.partition("@")
        try:
            return selectors.version_get(user=user, repo_id=ref, revision=revision)
        except ApplicationError as exc:
            raise CommandError(exc.message) from None

    def _options(self, pairs):
        import json

        options = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise CommandError(f"--option {pair!r} must look like KEY=VALUE")
            try:
                options[key] = json.loads(value)
            except json.JSONDecodeError:
                options[key] = value
        return options
