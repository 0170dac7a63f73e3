from django.urls import path, re_path

from routing.inference import views

app_name = "inference"

urlpatterns = [
    path("v1/models", views.models, name="models"),
    # Adapter ids hold a slash ("owner/slug"), as Hugging Face model ids do. Any character
    # may follow, a line feed included ((?s)), so that an odd id is a model_not_found.
    re_path(r"^v1/models/(?P<model_id>(?s:.+))$", views.model_detail, name="model-detail"),
    path("v1/chat/completions", views.chat_completions, name="chat-completions"),
    path("v1/completions", views.completions, name="completions"),
    path("healthz", views.health, name="health"),
    re_path(r"(?s)^.*$", views.not_found, name="not-found"),
]

# Whatever still escapes (a path Django cannot resolve at all, a failure in a view's
# wrapper) answers in OpenAI's shape: the portal's HTML pages are not served here, and
# cannot render without its URLs.
handler404 = views.handler404
handler500 = views.handler500
