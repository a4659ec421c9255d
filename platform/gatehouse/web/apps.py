from django.apps import AppConfig


class WebConfig(AppConfig):
    name = "gatehouse.web"
    label = "web"
