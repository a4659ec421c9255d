"""/v1: the OpenAI-compatible inference API."""
from django.urls import path, re_path

from releases.inference import views

urlpatterns = [
    path("models", views.models, name="openai-models"),
    path("models/<path:model_id>", views.model_detail, name="openai-model"),
    path("completions", views.completions, name="openai-completions"),
    path("chat/completions", views.chat_completions, name="openai-chat-completions"),
    re_path(r"^(?P<path>.*)$", views.no_route),  # last: anything else under /v1/ is OpenAI's 404, never a web page
]
