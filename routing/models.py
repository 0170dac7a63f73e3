"""The live mixture: immutable snapshots of the admitted adapter versions.

Every admission, withdrawal or suspension writes a new MixtureVersion in the same
transaction as the status change, and makes it the active one; rolling back re-activates
an earlier snapshot. The serving process polls the single active row and loads only what
changed between the snapshot it has and the active one.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q

from contributions.models import AdapterVersion


class MixtureVersion(models.Model):
    number = models.PositiveIntegerField(unique=True)
    members = models.ManyToManyField(AdapterVersion, through="MixtureMember", related_name="+")
    router = models.CharField(max_length=20, default="embedding")
    router_settings = models.JSONField(default=dict)
    reason = models.TextField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    is_active = models.BooleanField(default=False)
    activated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-number"]
        constraints = [
            # selectors.mixture_active(): the serving process polls exactly this row.
            models.UniqueConstraint(
                fields=["is_active"], condition=Q(is_active=True), name="one_active_mixture"
            ),
        ]

    def __str__(self) -> str:
        return f"mixture v{self.number}"


class MixtureMember(models.Model):
    mixture = models.ForeignKey(MixtureVersion, on_delete=models.CASCADE, related_name="entries")
    version = models.ForeignKey(AdapterVersion, on_delete=models.PROTECT, related_name="+")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["mixture", "version"], name="one_entry_per_version"),
        ]

    def __str__(self) -> str:
        return f"{self.version} in {self.mixture}"


# --- Usage of the public API ------------------------------------------------------------
# The API server counts every request in Redis (routing.usage.usage_record); Celery beat
# moves those counters here every TESSERA_USAGE_FLUSH_SECONDS (routing.usage.usage_flush).
# Two tables rather than one with two nullable keys: each has one natural unique key, and
# the per-adapter table is the leaderboard's, the per-key table the key owner's.


class UsageCounters(models.Model):
    day = models.DateField(help_text="UTC day the requests were served.")
    requests = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        abstract = True

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class KeyUsageDaily(UsageCounters):
    """One row per UTC day and API key; a user's requests without a key (a portal session)
    get a row of their own with ``api_token`` null."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    api_token = models.ForeignKey(
        "contributions.ApiToken",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="usage_days",
    )

    class Meta:
        ordering = ["-day"]
        constraints = [
            # Token first: usage_selectors.key_usage_totals() reads one user's keys by day.
            models.UniqueConstraint(fields=["api_token", "day"], name="key_usage_one_row_per_day"),
            models.UniqueConstraint(
                fields=["user", "day"],
                condition=Q(api_token__isnull=True),
                name="key_usage_one_keyless_row_per_day",
            ),
        ]
        verbose_name = "API key usage (daily)"
        verbose_name_plural = "API key usage (daily)"

    def __str__(self) -> str:
        return f"{self.api_token or 'no key'} on {self.day}"


class AdapterUsageDaily(UsageCounters):
    """One row per UTC day and adapter version; ``adapter_version`` null is the base model
    answering alone. A request served by several versions counts whole for each."""

    adapter_version = models.ForeignKey(
        AdapterVersion,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="usage_days",
    )

    class Meta:
        ordering = ["-day"]
        constraints = [
            models.UniqueConstraint(
                fields=["adapter_version", "day"], name="adapter_usage_one_row_per_day"
            ),
            # NULLs are distinct in a unique index: the base model needs its own constraint.
            models.UniqueConstraint(
                fields=["day"],
                condition=Q(adapter_version__isnull=True),
                name="adapter_usage_one_base_row_per_day",
            ),
        ]
        indexes = [
            # usage_selectors.adapter_usage_totals(): every adapter over the last N days.
            models.Index(fields=["day"], name="adapter_usage_day_idx"),
        ]
        verbose_name = "adapter usage (daily)"
        verbose_name_plural = "adapter usage (daily)"

    def __str__(self) -> str:
        return f"{self.adapter_version or 'base model'} on {self.day}"


class UsageBatch(models.Model):
    """A batch of Redis counters already added to the daily tables.

    Written in the same transaction as the increments, so a flush that crashed after its
    commit, or a second flush racing it over the same batch, finds the batch here and only
    deletes it from Redis: every counter is applied exactly once.
    """

    batch_id = models.CharField(max_length=32, unique=True)
    applied_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"usage batch {self.batch_id}"


# --- The scoreboard ---------------------------------------------------------------------


class Scoreboard(models.Model):
    """The composed system of one mixture version, scored on the union of the built-in
    suites' hidden and paraphrase splits: the base model, each member alone, the best
    single member, the routed mixture per router, and oracle routing (per example, the best
    of the base model and every member). Computed by a Celery job when the mixture is
    published (routing.scoreboard); ``figures`` holds aggregates only, never an example."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"
        SUPERSEDED = "superseded", "Superseded by a newer mixture version"

    mixture = models.OneToOneField(
        MixtureVersion, on_delete=models.CASCADE, related_name="scoreboard"
    )
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    failure_reason = models.TextField(blank=True)
    figures = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-mixture__number"]

    def __str__(self) -> str:
        return f"scoreboard of {self.mixture} ({self.status})"


# --- The learned router -----------------------------------------------------------------


def _learned_router_upload_to(instance: LearnedRouter, filename: str) -> str:
    return f"routers/mixture-{instance.mixture.number}/{filename}"


class LearnedRouter(models.Model):
    """The ``learned`` router of one mixture version, trained by a Celery job when the
    mixture is published (routing.learned) from measured outcomes on the built-in suites'
    public splits and the members' example prompts. The fitted arrays live in
    ``parameters_file`` as an .npz read with allow_pickle=False (never a pickle: the file is
    data, not code); the small choices beside them are JSON here."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"
        SUPERSEDED = "superseded", "Superseded by a newer mixture version"

    class Kind(models.TextChoices):
        KNN = "knn", "k nearest neighbours"
        LINEAR = "linear", "Linear (logistic regression per candidate)"

    mixture = models.OneToOneField(
        MixtureVersion, on_delete=models.CASCADE, related_name="learned_router"
    )
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    kind = models.CharField(max_length=10, choices=Kind.choices, blank=True)
    # The chosen kind's hyperparameters (k for knn, C for linear).
    params = models.JSONField(default=dict, blank=True)
    # Cross-validated routing accuracy per kind tried, with its best hyperparameters.
    cv_accuracy = models.JSONField(default=dict, blank=True)
    # What it was trained on: counts per source and candidate, never an example's text.
    training = models.JSONField(default=dict, blank=True)
    parameters_file = models.FileField(
        upload_to=_learned_router_upload_to, max_length=500, blank=True
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    trained_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)  # done, failed or superseded
    failure_reason = models.TextField(blank=True)

    class Meta:
        ordering = ["-mixture__number"]

    def __str__(self) -> str:
        return f"learned router of {self.mixture} ({self.status})"


# --- The merged adapter -----------------------------------------------------------------


def _merged_adapter_upload_to(instance: MergedAdapter, filename: str) -> str:
    return f"merged/mixture-{instance.mixture.number}/{filename}"


class MergedAdapter(models.Model):
    """One LoRA merged from a mixture version's public members with PEFT's
    ``add_weighted_adapter`` (routing.merging), built by a Celery job when the mixture is
    published and served as model "tessera-merged". Private members are left out: the merged
    adapter is served to everyone. ``weights_file`` holds the merged lora_A/lora_B tensors
    (safetensors, PEFT's names) and ``config_file`` its adapter_config.json; the serving
    process loads it from ``adapter_config`` and the weights, like any admitted version.

    A mixture without public members is done with no files and the reason in ``reason``."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"
        SUPERSEDED = "superseded", "Superseded by a newer mixture version"

    class Method(models.TextChoices):
        TIES = "ties", "TIES"
        DARE_TIES = "dare_ties", "DARE + TIES"

    mixture = models.OneToOneField(
        MixtureVersion, on_delete=models.CASCADE, related_name="merged_adapter"
    )
    method = models.CharField(max_length=10, choices=Method.choices, default=Method.TIES)
    density = models.FloatField(default=0.5)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    # Why it failed, or why a done build has no weights (no public members).
    reason = models.TextField(blank=True)
    # The versions merged, in merge order (their primary keys).
    version_ids = models.JSONField(default=list, blank=True)
    rank = models.PositiveSmallIntegerField(null=True, blank=True)
    adapter_config = models.JSONField(
        default=dict, blank=True, help_text="The merged adapter's normalised LoRA config."
    )
    config_file = models.FileField(upload_to=_merged_adapter_upload_to, max_length=500, blank=True)
    weights_file = models.FileField(upload_to=_merged_adapter_upload_to, max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-mixture__number"]

    def __str__(self) -> str:
        return f"merged adapter of {self.mixture} ({self.status})"
