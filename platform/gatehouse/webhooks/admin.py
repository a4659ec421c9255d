from django import forms
from django.contrib import admin

from gatehouse.webhooks.models import WebhookDelivery, WebhookEndpoint
from gatehouse.webhooks.services import webhook_url_refusal


class WebhookEndpointForm(forms.ModelForm):
    """The admin site is another way to set a URL: it gets the same SSRF checks as the API."""

    url = forms.CharField(max_length=500)  # webhook_url_check validates the whole URL, with reasons

    class Meta:
        model = WebhookEndpoint
        fields = "__all__"

    def clean_url(self):
        url = self.cleaned_data["url"]
        refusal = webhook_url_refusal(url)
        if refusal:
            raise forms.ValidationError(refusal)
        return url


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    form = WebhookEndpointForm
    list_display = ["organization", "url", "events", "is_active", "created_at"]


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = ["event", "endpoint", "status", "attempts", "last_status_code", "created_at", "delivered_at"]
    list_filter = ["status", "event"]
    readonly_fields = [f.name for f in WebhookDelivery._meta.fields]
