"""The routing REST API: the scoreboard (public)."""

from routing.api import views

app_name = "routing-api"

urlpatterns = [*views.urlpatterns]
