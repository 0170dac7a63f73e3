from django.urls import path

from contributions.api import views

app_name = "api"

urlpatterns = [
    path("intake-rules/", views.IntakeRulesApi.as_view(), name="intake-rules"),
    path("me/", views.MeApi.as_view(), name="me"),
    path("base-model/", views.BaseModelManifestApi.as_view(), name="base-model"),
    # <path:…>: a name with a slash reaches the view too, and is refused there like any
    # other name the manifest does not list.
    path(
        "base-model/files/<path:name>",
        views.BaseModelFileApi.as_view(),
        name="base-model-file",
    ),
    path("adapters/", views.AdapterListApi.as_view(), name="adapter-list"),
    path("adapters/<int:adapter_id>/", views.AdapterDetailApi.as_view(), name="adapter-detail"),
    path(
        "adapters/<int:adapter_id>/versions/",
        views.VersionListApi.as_view(),
        name="version-list",
    ),
    path(
        "adapters/<int:adapter_id>/versions/<int:number>/",
        views.VersionDetailApi.as_view(),
        name="version-detail",
    ),
    path(
        "adapters/<int:adapter_id>/versions/<int:number>/withdraw/",
        views.VersionWithdrawApi.as_view(),
        name="version-withdraw",
    ),
    path(
        "adapters/<int:adapter_id>/versions/<int:number>/files/<str:name>",
        views.VersionFileApi.as_view(),
        name="version-file",
    ),
]
