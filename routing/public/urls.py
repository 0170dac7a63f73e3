from django.urls import path, register_converter

from routing.public import views

app_name = "public"


class ModelIdConverter:
    """``owner/slug``, as the leaderboard and the API name a model: templates reverse a card's
    URL from the model id they already hold."""

    regex = r"[^/]+/[^/]+"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(ModelIdConverter, "model_id")

urlpatterns = [
    path("models/<model_id:model_id>/", views.model_card, name="model-card"),
    path("contributors/<str:username>/", views.contributor, name="contributor"),
]
