"""Input and output serializers for the contributions API. Inputs never carry status,
owner or any admission field: those change only through services."""

from __future__ import annotations

from django.urls import reverse
from rest_framework import serializers

from contributions.licenses import LICENSE_CHOICES
from contributions.models import Adapter, AdapterVersion, AuditEvent


class AuditEventOut(serializers.ModelSerializer):
    actor = serializers.SerializerMethodField()
    version = serializers.IntegerField(source="version.number", allow_null=True, default=None)

    class Meta:
        model = AuditEvent
        fields = ["action", "actor", "version", "from_status", "to_status", "reason", "created_at"]

    def get_actor(self, event: AuditEvent) -> str | None:
        return event.actor.get_username() if event.actor else None


class VersionOut(serializers.ModelSerializer):
    base_model = serializers.CharField(source="base_model.name")
    files = serializers.SerializerMethodField()

    class Meta:
        model = AdapterVersion
        fields = [
            "number",
            "status",
            "status_changed_at",
            # A platform fault's code when the evaluation ended on one (the same weights may
            # be uploaded again), else blank.
            "platform_fault",
            "created_at",
            "base_model",
            "rank",
            "alpha",
            "dropout",
            "target_modules",
            "dtype",
            "tensor_count",
            "parameter_count",
            "size_bytes",
            "config_sha256",
            "weights_sha256",
            "card_sha256",
            "files",
        ]

    def get_files(self, version: AdapterVersion) -> dict[str, str]:
        request = self.context.get("request")
        names = ["adapter_config.json", "adapter_model.safetensors"]
        if version.card_file:
            names.append("README.md")
        urls = {}
        for name in names:
            path = reverse(
                "api:version-file",
                kwargs={"adapter_id": version.adapter_id, "number": version.number, "name": name},
            )
            urls[name] = request.build_absolute_uri(path) if request else path
        return urls


class VersionDetailOut(VersionOut):
    audit_trail = serializers.SerializerMethodField()
    adapter_config = serializers.JSONField()

    class Meta(VersionOut.Meta):
        fields = [*VersionOut.Meta.fields, "adapter_config", "audit_trail"]

    def get_audit_trail(self, version: AdapterVersion) -> list[dict]:
        events = self.context["audit_events"]
        return AuditEventOut(events, many=True).data


class LatestVersionOut(serializers.Serializer):
    number = serializers.IntegerField()
    status = serializers.CharField()


class AdapterOut(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.get_username")
    owner_display_name = serializers.SerializerMethodField()
    version_count = serializers.IntegerField(read_only=True, default=0)

    class Meta:
        model = Adapter
        fields = [
            "id",
            "owner",
            "owner_display_name",
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
            "version_count",
            "created_at",
            "updated_at",
        ]

    def get_owner_display_name(self, adapter: Adapter) -> str:
        contributor = getattr(adapter.owner, "contributor", None)
        return contributor.display_name if contributor else adapter.owner.get_username()


class AdapterPageOut(serializers.Serializer):
    """One page of LimitOffsetPagination, as the list view answers (``?limit=&offset=``)."""

    count = serializers.IntegerField()
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    results = AdapterOut(many=True)


class AdapterDetailOut(AdapterOut):
    versions = VersionOut(many=True)
    audit_trail = AuditEventOut(source="audit_events", many=True)

    class Meta(AdapterOut.Meta):
        fields = [*AdapterOut.Meta.fields, "versions", "audit_trail"]


class StringList(serializers.ListField):
    child = serializers.CharField(max_length=2000, allow_blank=False)


class AdapterIn(serializers.Serializer):
    slug = serializers.RegexField(
        r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$",
        max_length=64,
        error_messages={"invalid": "Use 1–64 lowercase letters, digits and hyphens."},
    )
    title = serializers.CharField(max_length=200)
    description = serializers.CharField(required=False, allow_blank=True, max_length=20000)
    task_tags = StringList(required=False, max_length=20)
    languages = StringList(required=False, max_length=20)
    license = serializers.ChoiceField(choices=LICENSE_CHOICES)
    intended_use = serializers.CharField(max_length=5000)
    training_data_summary = serializers.CharField(max_length=5000)
    example_prompts = StringList(min_length=3, max_length=50)
    visibility = serializers.ChoiceField(
        choices=Adapter.Visibility.choices, default=Adapter.Visibility.PUBLIC
    )


class AdapterPatchIn(AdapterIn):
    slug = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, partial=True, **kwargs)


class VersionUploadIn(serializers.Serializer):
    files = serializers.ListField(
        child=serializers.FileField(allow_empty_file=True),
        allow_empty=False,
        help_text=(
            "adapter_config.json and adapter_model.safetensors (optionally README.md) as "
            "separate parts, or one .zip / .tar.gz holding them."
        ),
    )


class WithdrawIn(serializers.Serializer):
    reason = serializers.CharField(required=False, allow_blank=True, max_length=2000)


class MeOut(serializers.Serializer):
    username = serializers.CharField()
    display_name = serializers.CharField(allow_blank=True)
    affiliation = serializers.CharField(allow_blank=True)
    is_public = serializers.BooleanField()
    is_maintainer = serializers.BooleanField()


class IntakeRulesOut(serializers.Serializer):
    base_model = serializers.CharField()
    base_model_aliases = serializers.ListField(child=serializers.CharField())
    target_modules = serializers.ListField(child=serializers.CharField())
    max_rank = serializers.IntegerField()
    max_alpha = serializers.FloatField()
    scale_range = serializers.ListField(
        child=serializers.FloatField(), help_text="[lowest, highest] lora_alpha / r."
    )
    max_dropout = serializers.FloatField()
    max_upload_bytes = serializers.IntegerField()
    allowed_dtypes = serializers.ListField(child=serializers.CharField())
    licenses = serializers.DictField(child=serializers.CharField())


class BaseModelFileOut(serializers.Serializer):
    name = serializers.CharField()
    size = serializers.IntegerField(help_text="Bytes.")
    sha256 = serializers.CharField()
    url = serializers.CharField(help_text="GET it with the same API token.")


class BaseModelManifestOut(serializers.Serializer):
    name = serializers.CharField()
    aliases = serializers.ListField(child=serializers.CharField())
    adapter_base_model_name = serializers.CharField(
        help_text="What an adapter trained on these files writes as base_model_name_or_path."
    )
    weights_sha256 = serializers.CharField()
    sha256 = serializers.CharField(
        help_text="sha256 of the files' listing, one `<sha256>  <name>` line each in name "
        "order (as sha256sum prints it): one value that names these exact files."
    )
    total_size = serializers.IntegerField(help_text="Bytes, all files together.")
    files = BaseModelFileOut(many=True)
