from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "gatehouse.accounts"
    label = "accounts"

    def ready(self):
        from gatehouse.accounts import schema  # noqa: F401  (registers the OpenAPI bearer scheme)
