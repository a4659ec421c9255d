from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "gatehouse.registry"
    label = "registry"
