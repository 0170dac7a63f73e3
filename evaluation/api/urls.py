"""The evaluation REST API: suites (maintainers upload, everyone reads public splits), runs
(progress, scores, logs), the review queue and appeals."""

from evaluation.api import review, runs, suites

app_name = "evaluation-api"

urlpatterns = [*suites.urlpatterns, *runs.urlpatterns, *review.urlpatterns]
