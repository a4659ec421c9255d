"""Leave a real release request in the approver queue and a gated model with a pending access request for the
demo (after seed_demo). Safe to re-run."""
from django.core.management.base import BaseCommand

from gatehouse.accounts.models import User
from gatehouse.registry.models import Model, RiskThreshold
from gatehouse.registry.services.records import risk_assessment_record
from gatehouse.registry.services.versions import model_card_update
from releases.access import access_policy_set_audience, access_policy_update, access_request_create
from releases.models import AccessRequest, InferenceBackend, ReleaseRequest
from releases.services import release_request_create, release_request_submit

RELEASE_CARD_SECTIONS = ("\n## Intended use\n\nCompleting Python code in teaching demos.\n\n"
                         "## Limitations\n\nA tiny model: it writes plausible-looking, often wrong code.\n\n"
                         "## Training data\n\nThe Python standard library's sources (PSF-2.0).\n")


class Command(BaseCommand):
    help = "Submit a policy-passing release request for the demo's trained model (aurora-labs/stdlib-coder)."

    def handle(self, *args, **options):
        self.seed_gated_model()
        model = Model.objects.filter(organization__slug="aurora-labs", name="stdlib-coder",
                                     latest_version__isnull=False).select_related("latest_version").first()
        alice = User.objects.filter(username="alice").first()
        if model is None or alice is None:
            self.stdout.write("No trained demo model (seed_demo --no-training?): no release request seeded.")
            return
        version = model.latest_version
        # Served by a local engine (serve_engines): members can chat with it now, everyone once it is released.
        InferenceBackend.objects.get_or_create(model=model, defaults={"kind": InferenceBackend.Kind.LOCAL})
        if ReleaseRequest.objects.filter(version=version).exists():
            return
        model_card_update(model=model, actor=alice, text=version.card + RELEASE_CARD_SECTIONS)
        for threshold in RiskThreshold.objects.filter(domain__framework__key="openai-preparedness",
                                                      domain__category="tracked", key="high"):
            risk_assessment_record(version=version, actor=alice, threshold=threshold, outcome="below", mitigation="pre",
                                   evaluator="Aurora safety team",
                                   elicitation="Tiny model: capability evaluations score at chance.")
        request = release_request_create(version=version, actor=alice, stages=[
            {"tier": "api", "after_days": 0}, {"tier": "open", "after_days": 90}])
        release_request_submit(request=request, actor=alice)
        self.stdout.write(f"Release request {request.pk} for {model.repo_id} awaits approval at /releases/queue "
                          "(log in as admin).")

    def seed_gated_model(self):
        """northwind-ai/breeze-3b becomes gated with manual review; bob's request waits for carol."""
        model = Model.objects.filter(organization__slug="northwind-ai", name="breeze-3b").first()
        carol, bob = User.objects.filter(username="carol").first(), User.objects.filter(username="bob").first()
        if model is None or carol is None or bob is None or AccessRequest.objects.filter(model=model).exists():
            return
        access_policy_set_audience(model_id=model.pk, audience="gated-manual")
        access_policy_update(model=model, actor=carol, request_fields=[
            {"name": "affiliation", "label": "Affiliation", "required": True},
            {"name": "intended_use", "label": "What will you use the model for?", "required": True}],
            acceptable_use="Research use only. No deployment in products; no generation of harassment or malware.")
        access_request_create(model=model, user=bob, fields={"affiliation": "Aurora Labs",
                                                             "intended_use": "Comparing small research models"},
                              accept_license=True, accept_acceptable_use=True)
        self.stdout.write(f"{model.repo_id} is gated; bob's access request awaits carol's review.")
