"""Celery application. Start a worker with: celery -A gatehouse worker -Q default,gpu"""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gatehouse.settings")

app = Celery("gatehouse")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
