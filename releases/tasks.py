from celery import shared_task


@shared_task(ignore_result=True)
def apply_due_releases_task() -> None:
    from releases.services import releases_apply_due

    releases_apply_due()


@shared_task(ignore_result=True)
def finish_abandoned_inference_calls_task() -> None:
    from releases.inference.metering import inference_calls_finish_abandoned

    inference_calls_finish_abandoned()
