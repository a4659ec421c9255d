from django.apps import AppConfig


class WebhooksConfig(AppConfig):
    name = "gatehouse.webhooks"
    label = "webhooks"
