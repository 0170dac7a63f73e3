from django.urls import path, re_path

from routing.inference import views

app_name = "inference"

urlpatterns = [
    path("v1/models", views.models, name="models"),
    # Adapter ids hold a slash ("owner/slug"), as Hugging Face model ids do.
    path("v1/models/<path:model_id>", views.model_detail, name="model-detail"),
    path("v1/chat/completions", views.chat_completions, name="chat-completions"),
    path("v1/completions", views.completions, name="completions"),
    path("healthz", views.health, name="health"),
    re_path(r"^.*$", views.not_found, name="not-found"),
]
