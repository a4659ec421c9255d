from celery import shared_task


@shared_task(acks_late=True, ignore_result=True)
def deliver_webhook_task(delivery_id: int) -> None:
    from gatehouse.webhooks.services import webhook_attempt

    _, retry_in = webhook_attempt(delivery_id=delivery_id)
    if retry_in is not None:
        deliver_webhook_task.apply_async((delivery_id,), countdown=retry_in)
