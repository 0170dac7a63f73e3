from django.urls import path

from routing.playground import views as playground
from routing.portal import views

app_name = "routing"

urlpatterns = [
    path("tokens/", views.tokens, name="tokens"),
    path("tokens/<int:token_id>/revoke/", views.token_revoke, name="token-revoke"),
    path("playground/", playground.playground, name="playground"),
    path("playground/stream/", playground.stream, name="playground-stream"),
]
