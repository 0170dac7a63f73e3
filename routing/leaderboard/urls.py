from django.urls import path

from routing.leaderboard import views

app_name = "leaderboard"

urlpatterns = [
    path("leaderboard/", views.index, name="index"),
]
