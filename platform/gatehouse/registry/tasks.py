from celery import shared_task


@shared_task(acks_late=True, ignore_result=True)
def verify_model_version_task(version_id: int) -> None:
    from gatehouse.registry.services.versions import model_version_verify

    model_version_verify(version_id=version_id)


@shared_task(acks_late=True, ignore_result=True)
def run_training_task(run_id: int, attempt: int) -> None:
    """Claims the run for this attempt; a duplicate or stale delivery finds nothing to claim and returns."""
    from gatehouse.registry.services.training import training_run_execute

    training_run_execute(run_id=run_id, attempt=attempt)


@shared_task(ignore_result=True)
def requeue_stale_training_runs_task() -> None:
    from gatehouse.registry.services.training import training_runs_requeue_stale

    training_runs_requeue_stale()
