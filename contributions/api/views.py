"""The contributions REST API. Views are thin: parse, call a selector or service, render."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from django.http import FileResponse
from django.urls import reverse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import APIException
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView

from contributions import selectors, services
from contributions.api import serializers as s
from contributions.base_models import MANIFEST_NAME
from contributions.intake import IntakeLimits, UploadPart
from contributions.intake.config import LORA_SCALE_RANGE, MAX_LORA_ALPHA, MAX_LORA_DROPOUT
from contributions.licenses import LICENSES
from contributions.models import Adapter, BaseModel
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
            "max_alpha": MAX_LORA_ALPHA,
            "scale_range": list(LORA_SCALE_RANGE),
            "max_dropout": MAX_LORA_DROPOUT,
            "max_upload_bytes": limits.max_upload_bytes,
            "allowed_dtypes": ["float16", "bfloat16", "float32"],
            "licenses": LICENSES,
        }
        return Response(s.IntakeRulesOut(data).data)


class AdapterListApi(APIView):
    @extend_schema(
        parameters=[
            OpenApiParameter("limit", int, description="Adapters per page (default 50)."),
            OpenApiParameter("offset", int, description="Adapters skipped."),
        ],
        responses=s.AdapterPageOut,
        operation_id="adapters_list",
    )
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
    @extend_schema(responses={200: s.MeOut, 401: ERROR_RESPONSES[401]}, operation_id="me")
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


# --- The base model's files ---------------------------------------------------------------------

# The name manage.py train_adapter writes into an adapter when the base model has it as an alias.
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
BASE_MODEL_ERRORS = {
    401: OpenApiResponse(description="Missing or invalid API token."),
    503: OpenApiResponse(
        description="No base model is active (`base_model_missing`), or this server has no "
        "prepared copy of it (`base_model_not_prepared`)."
    ),
}


class BaseModelUnavailable(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "base_model_not_prepared"
    default_detail = "The base model is not prepared on this server."


def _prepared_copy(base_model: BaseModel) -> tuple[Path, dict[str, dict]]:
    """The prepared folder and its manifest's files (``{name: {"size", "sha256"}}``): the
    config, tokenizer files and weights the platform loads, never the manifest itself.

    Refused with 503 unless the folder holds the complete copy of this very base model: a
    manifest for its weights, and every listed file there with its listed size. Hashes are
    not recomputed on each request (the prepare command checks them); clients check them."""
    folder = Path(base_model.local_path)
    files = _listed_files(folder, weights_sha256=base_model.weights_sha256)
    if files is None:
        raise BaseModelUnavailable(
            f"The base model {base_model.name} has no prepared copy on this server; an "
            "operator must run 'python manage.py prepare_base_model' here.",
            code="base_model_not_prepared",
        )
    return folder, files


def _listed_files(folder: Path, *, weights_sha256: str) -> dict[str, dict] | None:
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        files = manifest["files"]
        if manifest.get("weights_sha256") != weights_sha256 or not files:
            return None
        for name, entry in files.items():
            if name in ("", ".", "..") or Path(name).name != name:
                return None
            if not isinstance(entry["sha256"], str):
                return None
            if (folder / name).stat().st_size != entry["size"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return files


def _active_base_model() -> BaseModel:
    try:
        return selectors.base_model_active()
    except DomainError as exc:  # no active row: unavailable, like a copy not yet prepared
        raise BaseModelUnavailable(exc.message, code=exc.code) from exc


def adapter_base_model_name(base_model: BaseModel) -> str:
    """The ``base_model_name_or_path`` an adapter trained on this base model writes, as
    manage.py train_adapter chooses it: the hub name when it is an alias, else the first
    ``org/name`` alias, else the model's name (all of them names intake accepts)."""
    if SMOLLM2_HUB_NAME in base_model.aliases:
        return SMOLLM2_HUB_NAME
    with_org = [alias for alias in base_model.aliases if "/" in alias and not alias.startswith("/")]
    return with_org[0] if with_org else base_model.name


def files_listing_sha256(files: dict[str, dict]) -> str:
    """sha256 of ``<sha256>  <name>`` lines in name order, as ``sha256sum`` prints them."""
    listing = "".join(f"{files[name]['sha256']}  {name}\n" for name in sorted(files))
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


class BaseModelManifestApi(APIView):
    """The active base model's prepared files, to download one by one (``tessera train``
    fetches them into its cache to train an adapter on a contributor's machine)."""

    @extend_schema(
        responses={200: s.BaseModelManifestOut, **BASE_MODEL_ERRORS},
        operation_id="base_model_manifest",
    )
    def get(self, request: Request) -> Response:
        base_model = _active_base_model()
        _folder, files = _prepared_copy(base_model)
        listed = [
            {
                "name": name,
                "size": files[name]["size"],
                "sha256": files[name]["sha256"],
                "url": request.build_absolute_uri(
                    reverse("api:base-model-file", kwargs={"name": name})
                ),
            }
            for name in sorted(files)
        ]
        data = {
            "name": base_model.name,
            "aliases": base_model.aliases,
            "adapter_base_model_name": adapter_base_model_name(base_model),
            "weights_sha256": base_model.weights_sha256,
            "sha256": files_listing_sha256(files),
            "total_size": sum(entry["size"] for entry in listed),
            "files": listed,
        }
        return Response(s.BaseModelManifestOut(data).data)


class BaseModelFileApi(APIView):
    """One file of the manifest, streamed. Only the manifest's names are served: anything
    else (another file in the folder, a path) is an unknown file."""

    @extend_schema(
        responses={
            (200, "application/octet-stream"): bytes,
            404: OpenApiResponse(
                description="Not a file of the manifest (`base_model_file_unknown`)."
            ),
            **BASE_MODEL_ERRORS,
        },
        operation_id="base_model_file",
    )
    def get(self, request: Request, name: str) -> FileResponse:
        folder, files = _prepared_copy(_active_base_model())
        if name not in files:
            raise DomainError(
                "base_model_file_unknown",
                f"The base model has no file {name!r}; GET /api/v1/base-model/ lists its files.",
                kind="not_found",
            )
        # FileResponse streams the file in blocks and closes it when the response is done.
        handle = open(folder / name, "rb")  # noqa: SIM115
        response = FileResponse(handle, as_attachment=True, filename=name)
        response["Content-Type"] = "application/octet-stream"
        return response
