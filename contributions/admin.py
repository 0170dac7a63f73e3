"""The Django admin, for maintainers to look things up.

It changes almost nothing on purpose: a version's status moves only through
contributions.services (compare-and-set plus an AuditEvent), adapters and tokens belong to
their contributors, and the base model is provisioned by a management command. So those are
shown read-only here; only a contributor's public profile may be edited (to moderate a
display name), and nothing can be deleted from here.
"""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html_join

from contributions.models import (
    Adapter,
    AdapterVersion,
    ApiToken,
    AuditEvent,
    BaseModel,
    Contributor,
)


class ReadOnlyAdminMixin:
    """View-only: no add, change or delete, whatever the user's permissions."""

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(BaseModel)
class BaseModelAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["name", "source", "revision", "is_active", "created_at"]
    list_filter = ["is_active"]
    fields = [
        "name",
        "source",
        "revision",
        "aliases",
        "local_path",
        "weights_sha256",
        "is_active",
        "architecture",
        "created_at",
        "updated_at",
    ]
    readonly_fields = fields


@admin.register(Contributor)
class ContributorAdmin(admin.ModelAdmin):
    list_display = ["display_name", "user", "affiliation", "is_public", "created_at"]
    list_filter = ["is_public"]
    search_fields = ["display_name", "user__username", "user__email", "affiliation"]
    fields = ["user", "display_name", "affiliation", "is_public", "created_at"]
    readonly_fields = ["user", "created_at"]
    list_select_related = ["user"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # A profile comes with its account (sign-up or contributor_ensure).

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


VERSION_FIELDS = [
    "number",
    "status",
    "status_changed_at",
    "rank",
    "alpha",
    "target_modules",
    "dtype",
    "size_bytes",
    "files",
    "weights_sha256",
    "config_sha256",
    "card_sha256",
    "created_at",
]


class VersionFilesMixin:
    @admin.display(description="Files")
    def files(self, version: AdapterVersion) -> str:
        # MEDIA_URL is never served (files are private): link the API's file view, which
        # checks that the reader is the owner or a maintainer.
        links = [
            (
                reverse("api:version-file", args=[version.adapter_id, version.number, name]),
                name,
            )
            for name, field in VERSION_FILE_FIELDS
            if getattr(version, field)
        ]
        return format_html_join(", ", '<a href="{}">{}</a>', links)


VERSION_FILE_FIELDS = [
    ("adapter_config.json", "config_file"),
    ("adapter_model.safetensors", "weights_file"),
    ("README.md", "card_file"),
]


class AdapterVersionInline(ReadOnlyAdminMixin, VersionFilesMixin, admin.TabularInline):
    model = AdapterVersion
    extra = 0
    fields = VERSION_FIELDS
    readonly_fields = VERSION_FIELDS
    ordering = ["-number"]


@admin.register(AdapterVersion)
class AdapterVersionAdmin(ReadOnlyAdminMixin, VersionFilesMixin, admin.ModelAdmin):
    list_display = ["__str__", "status", "status_changed_at", "rank", "dtype", "size_bytes"]
    list_filter = ["status", "dtype", "created_at"]
    search_fields = ["adapter__slug", "adapter__owner__username", "weights_sha256"]
    list_select_related = ["adapter__owner"]
    fields = [
        "adapter",
        "base_model",
        *VERSION_FIELDS,
        "tensor_count",
        "parameter_count",
        "adapter_config",
    ]
    readonly_fields = fields


class AuditEventInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = AuditEvent
    extra = 0
    fields = ["created_at", "actor", "version", "action", "from_status", "to_status", "reason"]
    readonly_fields = fields
    ordering = ["created_at", "id"]


@admin.register(Adapter)
class AdapterAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["slug", "title", "owner", "license", "visibility", "created_at"]
    list_filter = ["visibility", "license", "created_at"]
    search_fields = ["slug", "title", "owner__username"]
    list_select_related = ["owner"]
    fields = [
        "owner",
        "slug",
        "title",
        "description",
        "task_tags",
        "languages",
        "license",
        "intended_use",
        "training_data_summary",
        "example_prompts",
        "visibility",
        "created_at",
        "updated_at",
    ]
    readonly_fields = fields
    inlines = [AdapterVersionInline, AuditEventInline]


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = [
        "created_at",
        "actor",
        "adapter",
        "version",
        "action",
        "from_status",
        "to_status",
    ]
    list_filter = ["action", "to_status", "from_status", "created_at"]
    search_fields = ["adapter__slug", "actor__username", "reason"]
    list_select_related = ["actor", "adapter__owner", "version__adapter__owner"]
    date_hierarchy = "created_at"
    fields = [
        "created_at",
        "actor",
        "adapter",
        "version",
        "action",
        "from_status",
        "to_status",
        "reason",
    ]
    readonly_fields = fields


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Shows which keys exist and who holds them (the key hash is never displayed); a
    maintainer may change a key's limits, nothing else. Keys are made and revoked by their
    owners on the portal."""

    list_display = [
        "name",
        "user",
        "key_prefix",
        "requests_per_minute",
        "tokens_per_day",
        "created_at",
        "last_used_at",
        "revoked_at",
    ]
    list_filter = ["created_at", "revoked_at"]
    search_fields = ["name", "prefix", "user__username"]
    list_select_related = ["user"]
    fields = list_display
    readonly_fields = ["name", "user", "key_prefix", "created_at", "last_used_at", "revoked_at"]

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    @admin.display(description="Key", ordering="prefix")
    def key_prefix(self, token: ApiToken) -> str:
        return f"tsr_{token.prefix}_…"
