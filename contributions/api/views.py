"""The contributions REST API. Views are thin: parse, call a selector or service, render."""

from __future__ import annotations

from django.http import FileResponse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView

from contributions import selectors, services
from contributions.api import serializers as s
from contributions.intake import IntakeLimits, UploadPart
from contributions.licenses import LICENSES
from contributions.models import Adapter
from contributions.upload_handlers import upload_limit_bytes
from tessera.errors import DomainError

ERROR_RESPONSES = {
    400: OpenApiResponse(description="Invalid input: `error.code` says which rule."),
    401: OpenApiResponse(description="Missing or invalid API token."),
    403: OpenApiResponse(description="Not allowed for this user."),
    404: OpenApiResponse(description="No such object, or not yours."),
}


def _require_owner(adapter: Adapter, request: Request, what: str) -> None:
    if adapter.owner_id != request.user.pk:
        raise DomainError("not_owner", f"Only the adapter's owner can {what}.", kind="forbidden")


class IntakeRulesApi(APIView):
    """What an upload must look like for this deployment's base model."""

    permission_classes = [AllowAny]

    @extend_schema(responses=s.IntakeRulesOut, operation_id="intake_rules")
    def get(self, request: Request) -> Response:
        base_model = selectors.base_model_active()
        limits = IntakeLimits.from_settings()
        data = {
            "base_model": base_model.name,
            "base_model_aliases": base_model.aliases,
            "target_modules": base_model.target_module_names,
            "max_rank": limits.max_rank,
            "max_upload_bytes": limits.max_upload_bytes,
            "allowed_dtypes": ["float16", "bfloat16", "float32"],
            "licenses": LICENSES,
        }
        return Response(s.IntakeRulesOut(data).data)


class AdapterListApi(APIView):
    @extend_schema(responses=s.AdapterOut(many=True), operation_id="adapters_list")
    def get(self, request: Request) -> Response:
        paginator = LimitOffsetPagination()
        adapters = selectors.adapter_list_visible(user=request.user)
        page = paginator.paginate_queryset(adapters, request, view=self)
        return paginator.get_paginated_response(s.AdapterOut(page, many=True).data)

    @extend_schema(
        request=s.AdapterIn,
        responses={201: s.AdapterDetailOut, **ERROR_RESPONSES},
        operation_id="adapters_create",
    )
    def post(self, request: Request) -> Response:
        serializer = s.AdapterIn(data=request.data)
        serializer.is_valid(raise_exception=True)
        adapter = services.adapter_create(owner=request.user, **serializer.validated_data)
        adapter = selectors.adapter_get_visible(user=request.user, adapter_id=adapter.pk)
        return Response(
            s.AdapterDetailOut(adapter, context={"request": request}).data,
            status=status.HTTP_201_CREATED,
        )


class AdapterDetailApi(APIView):
    @extend_schema(responses={200: s.AdapterDetailOut, **ERROR_RESPONSES})
    def get(self, request: Request, adapter_id: int) -> Response:
        adapter = selectors.adapter_get_visible(user=request.user, adapter_id=adapter_id)
        return Response(s.AdapterDetailOut(adapter, context={"request": request}).data)

    @extend_schema(request=s.AdapterPatchIn, responses={200: s.AdapterDetailOut, **ERROR_RESPONSES})
    def patch(self, request: Request, adapter_id: int) -> Response:
        adapter = selectors.adapter_get_visible(user=request.user, adapter_id=adapter_id)
        _require_owner(adapter, request, "change it")
        serializer = s.AdapterPatchIn(data=request.data)
        serializer.is_valid(raise_exception=True)
        services.adapter_update(adapter=adapter, actor=request.user, **serializer.validated_data)
        adapter = selectors.adapter_get_visible(user=request.user, adapter_id=adapter_id)
        return Response(s.AdapterDetailOut(adapter, context={"request": request}).data)


class VersionListApi(APIView):
    parser_classes = [MultiPartParser, FormParser]
    throttle_scope = "uploads"

    def get_throttles(self):
        throttles = super().get_throttles()
        if self.request.method == "POST":
            throttles.append(ScopedRateThrottle())
        return throttles

    @extend_schema(responses={200: s.VersionOut(many=True), **ERROR_RESPONSES})
    def get(self, request: Request, adapter_id: int) -> Response:
        adapter = selectors.adapter_get_visible(user=request.user, adapter_id=adapter_id)
        return Response(
            s.VersionOut(adapter.versions.all(), many=True, context={"request": request}).data
        )

    @extend_schema(
        request={"multipart/form-data": s.VersionUploadIn},
        responses={
            201: s.VersionDetailOut,
            409: OpenApiResponse(description="Identical weights were uploaded before."),
            413: OpenApiResponse(description="The upload is over the size cap."),
            **ERROR_RESPONSES,
        },
        operation_id="versions_upload",
    )
    def post(self, request: Request, adapter_id: int) -> Response:
        adapter = selectors.adapter_get_visible(user=request.user, adapter_id=adapter_id)
        _require_owner(adapter, request, "upload versions")
        files = request.FILES.getlist("files")
        if getattr(request._request, "upload_too_large", False):
            raise DomainError(
                "upload_too_large",
                f"The upload is over the {upload_limit_bytes() // (1024 * 1024)} MiB cap.",
                kind="too_large",
            )
        serializer = s.VersionUploadIn(data={"files": files})
        serializer.is_valid(raise_exception=True)
        parts = [UploadPart(name=f.name, data=f.read()) for f in files]
        version = services.adapter_version_create(adapter=adapter, actor=request.user, parts=parts)
        return _version_response(request, version, status.HTTP_201_CREATED)


def _version_response(request: Request, version, code: int = status.HTTP_200_OK) -> Response:
    version = selectors.version_get_visible(
        user=request.user, adapter_id=version.adapter_id, number=version.number
    )
    events = selectors.audit_events_for_version(version=version)
    context = {"request": request, "audit_events": events}
    return Response(s.VersionDetailOut(version, context=context).data, status=code)


class VersionDetailApi(APIView):
    @extend_schema(responses={200: s.VersionDetailOut, **ERROR_RESPONSES})
    def get(self, request: Request, adapter_id: int, number: int) -> Response:
        version = selectors.version_get_visible(
            user=request.user, adapter_id=adapter_id, number=number
        )
        return _version_response(request, version)


class VersionWithdrawApi(APIView):
    @extend_schema(
        request=s.WithdrawIn,
        responses={200: s.VersionDetailOut, 409: OpenApiResponse(description="Already withdrawn.")},
    )
    def post(self, request: Request, adapter_id: int, number: int) -> Response:
        version = selectors.version_get_visible(
            user=request.user, adapter_id=adapter_id, number=number
        )
        serializer = s.WithdrawIn(data=request.data)
        serializer.is_valid(raise_exception=True)
        services.adapter_version_withdraw(
            version=version, actor=request.user, reason=serializer.validated_data.get("reason", "")
        )
        return _version_response(request, version)


VERSION_FILES = {
    "adapter_config.json": ("config_file", "application/json"),
    "adapter_model.safetensors": ("weights_file", "application/octet-stream"),
    "README.md": ("card_file", "text/markdown; charset=utf-8"),
}


class VersionFileApi(APIView):
    """Download a version's files (owner and maintainers)."""

    @extend_schema(responses={(200, "application/octet-stream"): bytes, **ERROR_RESPONSES})
    def get(self, request: Request, adapter_id: int, number: int, name: str):
        version = selectors.version_get_visible(
            user=request.user, adapter_id=adapter_id, number=number
        )
        field, content_type = VERSION_FILES.get(name, (None, None))
        if field is None or not getattr(version, field):
            raise DomainError("not_found", "No such file.", kind="not_found")
        response = FileResponse(
            getattr(version, field).open("rb"), as_attachment=True, filename=name
        )
        response["Content-Type"] = content_type
        return response


class MeApi(APIView):
    @extend_schema(operation_id="me")
    def get(self, request: Request) -> Response:
        contributor = services.contributor_ensure(user=request.user)
        return Response(
            {
                "username": request.user.get_username(),
                "display_name": contributor.display_name,
                "affiliation": contributor.affiliation,
                "is_public": contributor.is_public,
                "is_maintainer": selectors.user_is_maintainer(request.user),
            }
        )
