from django.contrib.auth import views as auth_views
from django.urls import path

from contributions.portal import views

app_name = "portal"

urlpatterns = [
    path("", views.home, name="home"),
    path("rules/", views.rules, name="rules"),
    path("signup/", views.signup, name="signup"),
    path("login/", views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("adapters/", views.dashboard, name="dashboard"),
    path("adapters/new/", views.adapter_new, name="adapter-new"),
    path("adapters/<int:adapter_id>/", views.adapter_detail, name="adapter-detail"),
    path("adapters/<int:adapter_id>/edit/", views.adapter_edit, name="adapter-edit"),
    path("adapters/<int:adapter_id>/upload/", views.version_upload, name="version-upload"),
    path(
        "adapters/<int:adapter_id>/versions/<int:number>/withdraw/",
        views.version_withdraw,
        name="version-withdraw",
    ),
]
