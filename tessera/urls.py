from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from tessera import health

# Adapter files are never served from MEDIA_URL: they are private to their owner and the
# maintainers, and go out through the API's file view, which checks who is asking.
urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("contributions.api.urls")),
    path("api/v1/", include("evaluation.api.urls")),
    path("api/v1/", include("routing.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/redoc/", SpectacularRedocView.as_view(url_name="schema"), name="api-redoc"),
    path("", include("contributions.portal.urls")),
    path("", include("evaluation.portal.urls")),
    path("", include("routing.portal.urls")),
    path("", include("routing.leaderboard.urls")),
    path("", include("routing.public.urls")),
]
