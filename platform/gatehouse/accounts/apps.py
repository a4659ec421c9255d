from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "gatehouse.accounts"
    label = "accounts"
