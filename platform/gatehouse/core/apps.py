from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "gatehouse.core"
    label = "core"
