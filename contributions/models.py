"""Contributions data model.

State changes of an AdapterVersion happen only in contributions.services (compare-and-set
update plus an AuditEvent); nothing here changes state in save() or in signals.
"""

from __future__ import annotations

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.db.models import Q

from contributions.licenses import LICENSE_CHOICES

SLUG_VALIDATOR = RegexValidator(
    r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$",
    "Use 1–64 lowercase letters, digits and hyphens, starting and ending with a letter or digit.",
    code="invalid_slug",
)


class Contributor(models.Model):
    """The public profile of a user who contributes adapters."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="contributor"
    )
    display_name = models.CharField(max_length=100)
    affiliation = models.CharField(max_length=200, blank=True)
    is_public = models.BooleanField(
        default=True, help_text="Show this name on the leaderboard and in attributions."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.display_name


class BaseModel(models.Model):
    """The one shared base model of a deployment, with the architecture intake checks against.

    ``architecture`` holds ``model_type``, ``num_hidden_layers`` and ``linear_modules``:
    every nn.Linear that LoRA may target, by full module path, as ``[in_features,
    out_features]``. ``aliases`` are the names an adapter_config.json may give for it.
    """

    name = models.CharField(max_length=200)
    source = models.CharField(max_length=500)
    revision = models.CharField(max_length=100, blank=True)
    aliases = models.JSONField(default=list)
    architecture = models.JSONField()
    local_path = models.CharField(max_length=1000, help_text="Directory with the safetensors copy.")
    weights_sha256 = models.CharField(max_length=64)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            # One active base model per deployment; selectors.base_model_active() reads it.
            models.UniqueConstraint(
                fields=["is_active"], condition=Q(is_active=True), name="one_active_base_model"
            ),
            models.UniqueConstraint(fields=["source", "revision"], name="base_model_source_rev"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def target_module_names(self) -> list[str]:
        return sorted({path.rsplit(".", 1)[-1] for path in self.architecture["linear_modules"]})


class Adapter(models.Model):
    """A named module a contributor maintains; its files live in AdapterVersions."""

    class Visibility(models.TextChoices):
        PUBLIC = "public", "Public"
        PRIVATE = "private", "Private (served to the owner's own keys only)"

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="adapters"
    )
    slug = models.CharField(max_length=64, validators=[SLUG_VALIDATOR])
    title = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    task_tags = models.JSONField(default=list)
    languages = models.JSONField(default=list)
    license = models.CharField(max_length=32, choices=LICENSE_CHOICES)
    intended_use = models.TextField()
    training_data_summary = models.TextField()
    example_prompts = models.JSONField()
    visibility = models.CharField(
        max_length=10, choices=Visibility.choices, default=Visibility.PUBLIC
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "slug"], name="adapter_slug_per_owner"),
            models.CheckConstraint(
                condition=Q(license__in=[code for code, _ in LICENSE_CHOICES]),
                name="adapter_license_known",
            ),
            models.CheckConstraint(
                condition=Q(slug__regex=SLUG_VALIDATOR.regex.pattern), name="adapter_slug_format"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.owner.get_username()}/{self.slug}"


def _version_upload_to(instance: AdapterVersion, filename: str) -> str:
    adapter = instance.adapter
    return f"adapters/{adapter.owner_id}/{adapter.slug}/v{instance.number}/{filename}"


class VersionStatus(models.TextChoices):
    """Where a version stands: uploaded → validated → queued → evaluating → passed | failed
    → admitted | rejected; later withdrawn (by its contributor) or suspended (maintainer)."""

    UPLOADED = "uploaded", "Uploaded"
    VALIDATED = "validated", "Validated"
    QUEUED = "queued", "Queued for evaluation"
    EVALUATING = "evaluating", "Evaluating"
    PASSED = "passed", "Passed evaluation"
    FAILED = "failed", "Failed evaluation"
    ADMITTED = "admitted", "Admitted"
    REJECTED = "rejected", "Rejected"
    WITHDRAWN = "withdrawn", "Withdrawn"
    SUSPENDED = "suspended", "Suspended"


class AdapterVersion(models.Model):
    """One uploaded set of files for an Adapter, and where it stands in review."""

    Status = VersionStatus

    adapter = models.ForeignKey(Adapter, on_delete=models.PROTECT, related_name="versions")
    number = models.PositiveIntegerField()
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="+")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.UPLOADED)
    status_changed_at = models.DateTimeField()

    config_file = models.FileField(upload_to=_version_upload_to, max_length=500)
    weights_file = models.FileField(upload_to=_version_upload_to, max_length=500)
    card_file = models.FileField(upload_to=_version_upload_to, max_length=500, blank=True)
    config_sha256 = models.CharField(max_length=64)
    weights_sha256 = models.CharField(max_length=64)
    card_sha256 = models.CharField(max_length=64, blank=True)
    size_bytes = models.PositiveBigIntegerField()

    rank = models.PositiveSmallIntegerField()
    alpha = models.FloatField()
    dropout = models.FloatField()
    target_modules = models.JSONField()
    dtype = models.CharField(max_length=16)
    tensor_count = models.PositiveIntegerField()
    parameter_count = models.PositiveBigIntegerField()
    adapter_config = models.JSONField(help_text="The validated, normalised LoRA config.")

    # Set by evaluation when the version's evaluation ended for good on a platform fault
    # (no sandbox, worker lost, ...), never on the adapter's merits: the code, else blank.
    # Such a version does not hold its weights: the same file may be uploaded again.
    platform_fault = models.CharField(max_length=64, blank=True, default="")

    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["adapter", "-number"]
        constraints = [
            models.UniqueConstraint(
                fields=["adapter", "number"], name="version_number_per_adapter"
            ),
            # An identical weights file is refused at intake; this keeps it true under races.
            # A version ended by a platform fault does not count (its weights may come again).
            models.UniqueConstraint(
                fields=["weights_sha256"],
                condition=Q(platform_fault=""),
                name="version_weights_unique",
            ),
            models.CheckConstraint(condition=Q(number__gte=1), name="version_number_positive"),
            models.CheckConstraint(condition=Q(rank__gte=1), name="version_rank_positive"),
            models.CheckConstraint(
                condition=Q(status__in=VersionStatus.values),
                name="version_status_known",
            ),
        ]
        indexes = [
            # selectors.versions_in_status(): the review queue and the mixture read by status.
            models.Index(fields=["status", "status_changed_at"], name="version_status_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.adapter} v{self.number}"


class AuditEvent(models.Model):
    """Who did what to an adapter or a version, when, and why. Append-only."""

    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="Empty for the system itself (intake, workers).",
    )
    adapter = models.ForeignKey(Adapter, on_delete=models.CASCADE, related_name="audit_events")
    version = models.ForeignKey(
        AdapterVersion,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="audit_events",
    )
    action = models.CharField(max_length=64)
    from_status = models.CharField(max_length=16, blank=True)
    to_status = models.CharField(max_length=16, blank=True)
    reason = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.action} {self.from_status}→{self.to_status}"


# The most requests per minute any API key may have (the deployment default included).
MAX_REQUESTS_PER_MINUTE = 10_000


class ApiToken(models.Model):
    """A key for the REST API. Only a SHA-256 of the secret is stored.

    The key reads ``tsr_<prefix>_<secret>``; the prefix finds the row, the hash proves it.
    A plain SHA-256 is enough here: the secret is 32 random bytes, not a password.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=12, unique=True)
    key_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # Limits on the public inference API. Null follows the deployment's default
    # (TESSERA_API_REQUESTS_PER_MINUTE, TESSERA_API_TOKENS_PER_DAY), so changing the default
    # reaches every key that never chose its own; routing.limits.token_limits() resolves them.
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_day = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Prompt plus completion tokens per UTC day."
    )

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # Zero would be a key that can never be used: revoke it instead. The ceiling
            # bounds the rate limiter's per-key log (routing.limits).
            models.CheckConstraint(
                condition=Q(requests_per_minute__isnull=True)
                | Q(requests_per_minute__gte=1, requests_per_minute__lte=MAX_REQUESTS_PER_MINUTE),
                name="api_token_requests_per_minute_range",
            ),
            models.CheckConstraint(
                condition=Q(tokens_per_day__isnull=True) | Q(tokens_per_day__gte=1),
                name="api_token_tokens_per_day_positive",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} (tsr_{self.prefix}_…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None
