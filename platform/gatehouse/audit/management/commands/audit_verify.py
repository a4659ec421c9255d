from django.core.management.base import BaseCommand, CommandError

from gatehouse.audit.services import audit_verify


class Command(BaseCommand):
    help = "Verify the audit log's hash chain; exits non-zero when any row was edited, removed or reordered."

    def handle(self, *args, **options):
        report = audit_verify()
        for problem in report.problems:
            self.stderr.write(problem)
        if not report.ok:
            raise CommandError(f"audit log tampered: {len(report.problems)} problem(s) in {report.checked} events")
        self.stdout.write(f"audit log intact: {report.checked} events verified")
