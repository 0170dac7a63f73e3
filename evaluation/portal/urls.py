from django.urls import path

from evaluation.portal import views

app_name = "evaluation"

urlpatterns = [
    path("policy/", views.policy, name="policy"),
    path("review/", views.review_queue, name="review-queue"),
    path("review/<int:version_id>/", views.review_detail, name="review-detail"),
    path("review/<int:version_id>/<str:decision>/", views.review_decide, name="review-decide"),
    path(
        "adapters/<int:adapter_id>/versions/<int:number>/appeal/",
        views.appeal,
        name="appeal",
    ),
    path("adapters/<int:adapter_id>/test-sets/", views.test_sets, name="test-sets"),
]
