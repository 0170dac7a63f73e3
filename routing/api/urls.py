"""The routing REST API: the scoreboard and the leaderboard (public)."""

from routing.api import leaderboard, views

app_name = "routing-api"

urlpatterns = [*views.urlpatterns, *leaderboard.urlpatterns]
