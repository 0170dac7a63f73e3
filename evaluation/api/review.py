"""The review API: the maintainers' queue and decisions, contributors' appeals and test sets.

Views are thin: check the input's shape, call a selector or a service, render. Who may do
what is decided in evaluation.review_selectors and the services; a DomainError becomes the
one JSON error shape in tessera.api.
"""

from __future__ import annotations

from django.urls import path
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from contributions import selectors
from contributions.models import Adapter
from evaluation import review_selectors
from evaluation.models import Appeal, ReviewDecision, Task
from evaluation.services import review as review_services
from evaluation.services import test_sets as test_set_services
from tessera.errors import DomainError

ERRORS = {
    400: OpenApiResponse(description="Invalid input: `error.code` says which rule."),
    401: OpenApiResponse(description="Missing or invalid API token."),
    403: OpenApiResponse(description="Not allowed for this user."),
    404: OpenApiResponse(description="No such object, or not yours."),
}
CONFLICT = {409: OpenApiResponse(description="The version is not in a state that allows this.")}


class IsMaintainer(BasePermission):
    """Anonymous → 401 (DRF asks for credentials first), contributors → 403."""

    message = "Only maintainers may do this."

    def has_permission(self, request, view) -> bool:
        return selectors.user_is_maintainer(request.user)


# --- Output -------------------------------------------------------------------------------


class ReviewTaskResultOut(serializers.Serializer):
    task = serializers.CharField(source="task.slug")
    title = serializers.CharField(source="task.title")
    suite = serializers.CharField(source="task.suite_version.suite.slug")
    split = serializers.CharField()
    is_target = serializers.BooleanField()
    n = serializers.IntegerField()
    base_score = serializers.FloatField()
    adapter_score = serializers.FloatField()
    delta = serializers.FloatField()
    ci_low = serializers.FloatField()
    ci_high = serializers.FloatField()


class ReviewRuleResultOut(serializers.Serializer):
    rule = serializers.CharField()
    passed = serializers.BooleanField()
    detail = serializers.CharField()
    values = serializers.JSONField()


class ReviewTestSetScoreOut(serializers.Serializer):
    name = serializers.CharField(source="test_set.name")
    metric = serializers.CharField(source="test_set.metric")
    n = serializers.IntegerField()
    base_score = serializers.FloatField()
    adapter_score = serializers.FloatField()


class ReviewRunReportOut(serializers.Serializer):
    id = serializers.IntegerField(source="run.pk")
    status = serializers.CharField(source="run.status")
    passed = serializers.BooleanField(source="run.passed", allow_null=True)
    needs_review = serializers.BooleanField(source="run.needs_review")
    created_at = serializers.DateTimeField(source="run.created_at")
    started_at = serializers.DateTimeField(source="run.started_at", allow_null=True)
    finished_at = serializers.DateTimeField(source="run.finished_at", allow_null=True)
    duration_seconds = serializers.FloatField(source="run.duration_seconds", allow_null=True)
    queue_seconds = serializers.FloatField(allow_null=True)
    task_results = ReviewTaskResultOut(many=True)
    rule_results = ReviewRuleResultOut(many=True)
    test_set_results = ReviewTestSetScoreOut(many=True)


class DecisionOut(serializers.ModelSerializer):
    maintainer = serializers.CharField(source="maintainer.get_username")

    class Meta:
        model = ReviewDecision
        fields = ["decision", "reason", "maintainer", "created_at"]


class AppealOut(serializers.ModelSerializer):
    class Meta:
        model = Appeal
        fields = ["message", "created_at"]


class VersionRefOut(serializers.Serializer):
    id = serializers.IntegerField(source="pk")
    adapter_id = serializers.IntegerField()
    owner = serializers.CharField(source="adapter.owner.get_username")
    slug = serializers.CharField(source="adapter.slug")
    title = serializers.CharField(source="adapter.title")
    number = serializers.IntegerField()
    status = serializers.CharField()
    status_changed_at = serializers.DateTimeField()


class PreviousOut(serializers.Serializer):
    number = serializers.IntegerField(source="version.number")
    status = serializers.CharField(source="version.status")
    report = ReviewRunReportOut(allow_null=True)


class SimilarOut(serializers.Serializer):
    version = VersionRefOut()
    similarity = serializers.FloatField()


class ReviewItemOut(serializers.Serializer):
    version = VersionRefOut()
    appealed = serializers.BooleanField()
    appeal = AppealOut(allow_null=True)
    report = ReviewRunReportOut(allow_null=True)
    model_card = serializers.CharField(
        allow_null=True, help_text="README.md as the contributor wrote it: plain text, untrusted."
    )
    model_card_truncated = serializers.BooleanField()
    previous = PreviousOut(allow_null=True)
    similar = SimilarOut(many=True, help_text="Admitted versions with nearly identical weights.")
    decisions = DecisionOut(many=True)


class DecisionIn(serializers.Serializer):
    # Blank is allowed here so the service answers it with its own code (reason_required).
    reason = serializers.CharField(
        allow_blank=True, required=False, default="", trim_whitespace=True
    )


class AppealIn(serializers.Serializer):
    message = serializers.CharField(allow_blank=True, required=False, default="")


class TestSetOut(serializers.Serializer):
    id = serializers.IntegerField(source="test_set.pk")
    name = serializers.CharField(source="test_set.name")
    metric = serializers.CharField(source="test_set.metric")
    examples = serializers.SerializerMethodField()
    source_sha256 = serializers.CharField(source="test_set.source_sha256")
    created_at = serializers.DateTimeField(source="test_set.created_at")
    latest = ReviewTestSetScoreOut(allow_null=True)
    latest_version = serializers.IntegerField(source="version_number", allow_null=True)

    def get_examples(self, row) -> int:
        return len(row.test_set.examples)


class TestSetIn(serializers.Serializer):
    # Loose on purpose: the service refuses each bad input with a code of its own.
    file = serializers.FileField(
        required=False, allow_null=True, default=None, allow_empty_file=True
    )
    name = serializers.CharField(allow_blank=True, required=False, default="")
    metric = serializers.CharField(
        allow_blank=True,
        required=False,
        default="",
        help_text=f"One of {', '.join(Task.Metric.values)}.",
    )


# --- Views --------------------------------------------------------------------------------


class ReviewQueueApi(APIView):
    """Versions waiting for a maintainer, oldest first, each with its full report."""

    permission_classes = [IsAuthenticated, IsMaintainer]

    @extend_schema(responses={200: ReviewItemOut(many=True), **ERRORS}, operation_id="review_queue")
    def get(self, request: Request) -> Response:
        items = review_selectors.review_queue(user=request.user)
        return Response(ReviewItemOut(items, many=True).data)


class ReviewVersionApi(APIView):
    permission_classes = [IsAuthenticated, IsMaintainer]

    @extend_schema(responses={200: ReviewItemOut, **ERRORS}, operation_id="review_version")
    def get(self, request: Request, version_id: int) -> Response:
        item = review_selectors.review_item_get(user=request.user, version_id=version_id)
        return Response(ReviewItemOut(item).data)


class _DecisionApi(APIView):
    permission_classes = [IsAuthenticated, IsMaintainer]
    decision: str = ""

    def decide(self, request: Request, version_id: int) -> Response:
        version = review_selectors.review_version_get(user=request.user, version_id=version_id)
        serializer = DecisionIn(data=request.data)
        serializer.is_valid(raise_exception=True)
        review_services.review_decide(
            version=version,
            actor=request.user,
            decision=self.decision,
            reason=serializer.validated_data["reason"],
        )
        item = review_selectors.review_item_get(user=request.user, version_id=version_id)
        return Response(ReviewItemOut(item).data)


DECISION_RESPONSES = {200: ReviewItemOut, **ERRORS, **CONFLICT}


class ReviewApproveApi(_DecisionApi):
    decision = ReviewDecision.Decision.APPROVE

    @extend_schema(
        request=DecisionIn,
        responses=DECISION_RESPONSES,
        operation_id="review_approve",
        summary="Approve a passed version: it is admitted.",
    )
    def post(self, request: Request, version_id: int) -> Response:
        return self.decide(request, version_id)


class ReviewRejectApi(_DecisionApi):
    decision = ReviewDecision.Decision.REJECT

    @extend_schema(
        request=DecisionIn,
        responses=DECISION_RESPONSES,
        operation_id="review_reject",
        summary="Reject a passed version; its owner may appeal once.",
    )
    def post(self, request: Request, version_id: int) -> Response:
        return self.decide(request, version_id)


class ReviewSuspendApi(_DecisionApi):
    decision = ReviewDecision.Decision.SUSPEND

    @extend_schema(
        request=DecisionIn,
        responses=DECISION_RESPONSES,
        operation_id="review_suspend",
        summary="Suspend a passed or admitted version.",
    )
    def post(self, request: Request, version_id: int) -> Response:
        return self.decide(request, version_id)


class AppealApi(APIView):
    """The owner's one appeal against a rejection."""

    parser_classes = [JSONParser, FormParser, MultiPartParser]

    @extend_schema(
        request=AppealIn,
        responses={
            201: AppealOut,
            **ERRORS,
            409: OpenApiResponse(description="Appealed already, or not rejected."),
        },
        operation_id="version_appeal",
    )
    def post(self, request: Request, adapter_id: int, number: int) -> Response:
        version = selectors.version_get_visible(
            user=request.user, adapter_id=adapter_id, number=number
        )
        serializer = AppealIn(data=request.data)
        serializer.is_valid(raise_exception=True)
        appeal = review_services.appeal_create(
            version=version, actor=request.user, message=serializer.validated_data["message"]
        )
        return Response(AppealOut(appeal).data, status=status.HTTP_201_CREATED)


class TestSetListApi(APIView):
    """An adapter's own public test sets (JSONL), scored in every run, never for admission."""

    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(responses={200: TestSetOut(many=True), **ERRORS}, operation_id="test_sets_list")
    def get(self, request: Request, adapter_id: int) -> Response:
        _, rows = review_selectors.adapter_test_sets(user=request.user, adapter_id=adapter_id)
        return Response(TestSetOut(rows, many=True).data)

    @extend_schema(
        request={"multipart/form-data": TestSetIn},
        responses={
            201: TestSetOut,
            409: OpenApiResponse(description="A test set of that name exists."),
            413: OpenApiResponse(description="Over 1 MiB."),
            **ERRORS,
        },
        operation_id="test_sets_create",
    )
    def post(self, request: Request, adapter_id: int) -> Response:
        adapter = selectors.adapter_get_visible(user=request.user, adapter_id=adapter_id)
        _require_owner(adapter, request)
        serializer = TestSetIn(data=request.data)
        serializer.is_valid(raise_exception=True)
        upload = serializer.validated_data["file"]
        if upload is None:
            raise DomainError(
                "test_set_file_required",
                "Attach the JSONL file as `file`.",
                details={"field": "file"},
            )
        test_set = test_set_services.contributor_test_set_create(
            adapter=adapter,
            actor=request.user,
            name=serializer.validated_data["name"],
            metric=serializer.validated_data["metric"],
            jsonl=_read_capped(upload),
        )
        row = review_selectors.ScoredTestSet(test_set=test_set, latest=None, version_number=None)
        return Response(TestSetOut(row).data, status=status.HTTP_201_CREATED)


def _require_owner(adapter: Adapter, request: Request) -> None:
    if adapter.owner_id != request.user.pk:
        raise DomainError(
            "not_owner", "Only the adapter's owner can attach test sets.", kind="forbidden"
        )


def _read_capped(upload) -> bytes:
    """Read one byte past the cap at most: the service refuses what is over it."""
    return upload.read(test_set_services.MAX_TEST_SET_BYTES + 1)


urlpatterns = [
    path("review/queue/", ReviewQueueApi.as_view(), name="review-queue"),
    path("review/versions/<int:version_id>/", ReviewVersionApi.as_view(), name="review-version"),
    path(
        "review/versions/<int:version_id>/approve/",
        ReviewApproveApi.as_view(),
        name="review-approve",
    ),
    path(
        "review/versions/<int:version_id>/reject/",
        ReviewRejectApi.as_view(),
        name="review-reject",
    ),
    path(
        "review/versions/<int:version_id>/suspend/",
        ReviewSuspendApi.as_view(),
        name="review-suspend",
    ),
    path(
        "adapters/<int:adapter_id>/versions/<int:number>/appeal/",
        AppealApi.as_view(),
        name="version-appeal",
    ),
    path("adapters/<int:adapter_id>/test-sets/", TestSetListApi.as_view(), name="test-sets"),
]
