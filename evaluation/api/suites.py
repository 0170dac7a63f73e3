"""Benchmark suites over the API: maintainers upload a suite version (JSONL); everyone,
anonymous visitors included, lists suites and downloads their public splits.

Hidden and paraphrase examples never leave through any of these views: the listing carries
only counts, and the download is built from public examples alone.
"""

from __future__ import annotations

from django.http import HttpResponse
from django.urls import path
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.exceptions import NotAuthenticated
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from contributions.selectors import user_is_maintainer
from contributions.upload_handlers import upload_limit_bytes
from evaluation import suites_selectors
from evaluation.models import Example, SuiteVersion
from evaluation.services.suites import suite_version_import
from evaluation.suite_io import public_jsonl
from tessera.errors import DomainError

ERROR_RESPONSES = {
    400: OpenApiResponse(description="Invalid suite file: `error.code` says which rule."),
    401: OpenApiResponse(description="Not signed in."),
    403: OpenApiResponse(description="Maintainers only."),
    413: OpenApiResponse(description="The file is too large."),
}


class TaskOut(serializers.Serializer):
    slug = serializers.CharField()
    title = serializers.CharField()
    description = serializers.CharField()
    tags = serializers.ListField(child=serializers.CharField())
    metric = serializers.CharField()
    prompt_template = serializers.CharField()
    max_new_tokens = serializers.IntegerField()
    counts = serializers.SerializerMethodField()

    def get_counts(self, task) -> dict[str, int]:
        return {
            "public": task.public_count,
            "hidden": task.hidden_count,
            "paraphrase": task.paraphrase_count,
        }


class SuiteVersionOut(serializers.Serializer):
    suite = serializers.CharField(source="suite.slug")
    title = serializers.CharField(source="suite.title")
    description = serializers.CharField(source="suite.description")
    purpose = serializers.CharField(source="suite.purpose")
    version = serializers.IntegerField(source="number")
    source_sha256 = serializers.CharField()
    is_current = serializers.BooleanField()
    locked = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    tasks = TaskOut(many=True)
    public_jsonl_url = serializers.SerializerMethodField()

    def get_locked(self, version) -> bool:
        return version.locked_at is not None

    def get_public_jsonl_url(self, version) -> str:
        request = self.context.get("request")
        url = f"/api/v1/suites/{version.suite.slug}/public.jsonl"
        return request.build_absolute_uri(url) if request is not None else url


class SuiteListApi(APIView):
    """GET: every suite's current version (anyone). POST: upload a version (maintainers)."""

    parser_classes = [MultiPartParser, FormParser]

    def get_permissions(self):
        return [AllowAny()]

    @extend_schema(responses=SuiteVersionOut(many=True), operation_id="suites_list", auth=[])
    def get(self, request: Request) -> Response:
        versions = suites_selectors.suite_versions_current()
        return Response(SuiteVersionOut(versions, many=True, context={"request": request}).data)

    @extend_schema(
        request=inline_serializer("SuiteUploadIn", {"file": serializers.FileField()}),
        responses={
            200: OpenApiResponse(SuiteVersionOut, description="Same file as the current version."),
            201: SuiteVersionOut,
            **ERROR_RESPONSES,
        },
        operation_id="suites_upload",
    )
    def post(self, request: Request) -> Response:
        if not request.user.is_authenticated:
            raise NotAuthenticated()
        if not user_is_maintainer(request.user):
            raise DomainError(
                "maintainers_only", "Only maintainers can upload suites.", kind="forbidden"
            )
        if getattr(request._request, "upload_too_large", False):
            raise DomainError(
                "upload_too_large",
                f"The upload is over the {upload_limit_bytes() // (1024 * 1024)} MiB cap.",
                kind="too_large",
            )
        upload = request.FILES.get("file")
        if upload is None:
            raise DomainError("suite_file_missing", "Send the suite as the multipart field 'file'.")
        result = suite_version_import(jsonl=upload.read(), actor=request.user)
        version = suites_selectors.suite_version_get(suite_version_id=result.version.pk)
        return Response(
            SuiteVersionOut(version, context={"request": request}).data,
            status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK,
        )


class SuitePublicJsonlApi(APIView):
    """The current version's PUBLIC split as a suite file (hidden and paraphrase examples
    left out)."""

    permission_classes = [AllowAny]

    @extend_schema(
        responses={
            (200, "application/jsonl"): OpenApiResponse(description="JSONL suite file."),
            404: OpenApiResponse(description="No such suite."),
        },
        operation_id="suites_public_jsonl",
        auth=[],
    )
    def get(self, request: Request, slug: str) -> HttpResponse:
        version = suites_selectors.suite_version_current(slug=slug)
        body = _public_body(version)
        response = HttpResponse(body, content_type="application/jsonl; charset=utf-8")
        filename = f"{version.suite.slug}-v{version.number}-public.jsonl"
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        return response


def _public_body(version: SuiteVersion) -> bytes:
    tasks = list(version.tasks.all())
    examples = {
        task.slug: list(
            task.examples.filter(split=Example.Split.PUBLIC)
            .order_by("position")
            .values("fields", "target", "choices")
        )
        for task in tasks
    }
    suite = version.suite
    return public_jsonl(
        suite={
            "suite": suite.slug,
            "title": suite.title,
            "description": suite.description,
            "purpose": suite.purpose,
        },
        tasks=[
            {
                "task": task.slug,
                "title": task.title,
                "description": task.description,
                "tags": task.tags,
                "metric": task.metric,
                "prompt_template": task.prompt_template,
                "max_new_tokens": task.max_new_tokens,
            }
            for task in tasks
        ],
        examples=examples,
    )


urlpatterns = [
    path("suites/", SuiteListApi.as_view(), name="suite-list"),
    path(
        "suites/<slug:slug>/public.jsonl",
        SuitePublicJsonlApi.as_view(),
        name="suite-public-jsonl",
    ),
]
