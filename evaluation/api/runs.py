"""Evaluation runs over the API: a version's runs, one run, and a light progress view for
polling. Owner and maintainers only (others get 404, anonymous 401).

Task results are aggregate numbers of the hidden split (n, means, delta, CI): no hidden
example, prompt or target is ever selected for a response.
"""

from __future__ import annotations

from django.urls import path
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from evaluation import selectors
from evaluation.models import EvaluationRun, RuleResult, TaskResult, TestSetResult

ERRORS = {
    401: OpenApiResponse(description="Missing or invalid API token."),
    404: OpenApiResponse(description="No such run or version, or not yours."),
}


class ProgressOut(serializers.Serializer):
    done = serializers.IntegerField(source="progress_done")
    total = serializers.IntegerField(source="progress_total")
    label = serializers.CharField(source="progress_label")
    fraction = serializers.SerializerMethodField()

    def get_fraction(self, run: EvaluationRun) -> float | None:
        if not run.progress_total:
            return None
        return round(run.progress_done / run.progress_total, 4)


class TaskResultOut(serializers.ModelSerializer):
    task = serializers.CharField(source="task.slug")
    title = serializers.CharField(source="task.title")
    suite = serializers.CharField(source="task.suite_version.suite.slug")
    suite_version = serializers.IntegerField(source="task.suite_version.number")
    metric = serializers.CharField(source="task.metric")

    class Meta:
        model = TaskResult
        fields = [
            "task",
            "title",
            "suite",
            "suite_version",
            "metric",
            "split",
            "is_target",
            "n",
            "base_score",
            "adapter_score",
            "delta",
            "ci_low",
            "ci_high",
        ]


class RuleResultOut(serializers.ModelSerializer):
    class Meta:
        model = RuleResult
        fields = ["rule", "passed", "detail", "values"]


class TestSetResultOut(serializers.ModelSerializer):
    name = serializers.CharField(source="test_set.name")
    metric = serializers.CharField(source="test_set.metric")

    class Meta:
        model = TestSetResult
        fields = ["name", "metric", "n", "base_score", "adapter_score"]


class RunOut(serializers.ModelSerializer):
    adapter_id = serializers.IntegerField(source="version.adapter_id")
    version = serializers.IntegerField(source="version.number")
    progress = ProgressOut(source="*")
    failure = serializers.SerializerMethodField()
    task_results = TaskResultOut(many=True)
    rule_results = RuleResultOut(many=True)
    test_set_results = TestSetResultOut(many=True)

    class Meta:
        model = EvaluationRun
        fields = [
            "id",
            "adapter_id",
            "version",
            "status",
            "queue",
            "attempts",
            "max_attempts",
            "created_at",
            "started_at",
            "heartbeat_at",
            "deadline_at",
            "finished_at",
            "duration_seconds",
            "progress",
            "failure",
            "passed",
            "needs_review",
            "task_results",
            "rule_results",
            "test_set_results",
        ]

    def get_failure(self, run: EvaluationRun) -> dict | None:
        if run.status != EvaluationRun.Status.FAILED:
            return None
        return {"code": run.failure_code, "reason": run.failure_reason}


class RunDetailOut(RunOut):
    """One run with its log (the child's stderr, capped): seen only by the owner and the
    maintainers, like everything here."""

    log = serializers.CharField()

    class Meta(RunOut.Meta):
        fields = [*RunOut.Meta.fields, "log"]


class RunProgressOut(serializers.ModelSerializer):
    progress = ProgressOut(source="*")

    class Meta:
        model = EvaluationRun
        fields = [
            "id",
            "status",
            "attempts",
            "progress",
            "failure_code",
            "passed",
            "heartbeat_at",
            "finished_at",
        ]


class VersionRunsApi(APIView):
    @extend_schema(responses={200: RunOut(many=True), **ERRORS}, operation_id="version_runs_list")
    def get(self, request: Request, adapter_id: int, number: int) -> Response:
        runs = selectors.runs_for_version_visible(
            user=request.user, adapter_id=adapter_id, number=number
        )
        return Response(RunOut(runs, many=True).data)


class RunDetailApi(APIView):
    @extend_schema(responses={200: RunDetailOut, **ERRORS}, operation_id="runs_retrieve")
    def get(self, request: Request, run_id: int) -> Response:
        run = selectors.run_get_visible(user=request.user, run_id=run_id)
        return Response(RunDetailOut(run).data)


class RunProgressApi(APIView):
    """Cheap enough to poll every second or two (no results, no log)."""

    @extend_schema(responses={200: RunProgressOut, **ERRORS}, operation_id="runs_progress")
    def get(self, request: Request, run_id: int) -> Response:
        run = selectors.run_progress_visible(user=request.user, run_id=run_id)
        return Response(RunProgressOut(run).data)


urlpatterns = [
    path(
        "adapters/<int:adapter_id>/versions/<int:number>/runs/",
        VersionRunsApi.as_view(),
        name="version-runs",
    ),
    path("runs/<int:run_id>/", RunDetailApi.as_view(), name="run-detail"),
    path("runs/<int:run_id>/progress/", RunProgressApi.as_view(), name="run-progress"),
]
