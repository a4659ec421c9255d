from celery import shared_task


@shared_task(acks_late=True, ignore_result=True)
def verify_model_version_task(version_id: int) -> None:
    from gatehouse.registry.services.versions import model_version_verify

    model_version_verify(version_id=version_id)
