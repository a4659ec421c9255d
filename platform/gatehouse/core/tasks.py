from celery import shared_task


@shared_task(ignore_result=True)
def redeliver_stranded_work_task() -> None:
    from gatehouse.core.redelivery import stranded_work_redeliver

    stranded_work_redeliver()
