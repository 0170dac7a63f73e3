"""Evaluation data model: benchmark suites, runs and their results, admission rules,
maintainers' review decisions, appeals, contributors' own test sets, routing signatures.

Run and version states change only in evaluation.services (compare-and-set updates);
nothing here changes state in save() or in signals.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q

from contributions.models import Adapter, AdapterVersion, BaseModel


class Suite(models.Model):
    """A named benchmark suite. Its examples live in immutable SuiteVersions."""

    class Purpose(models.TextChoices):
        SKILL = "skill", "Skills adapters target"
        GENERAL = "general", "General ability (guards against harm)"
        # Never read by admission (nothing targets it, it is not the general suite) nor
        # part of the scoreboard's union: it judges composed mixtures only.
        COMPOSITE = "composite", "Two skills in one answer (judges mixtures)"

    slug = models.SlugField(max_length=64, unique=True)
    title = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    purpose = models.CharField(max_length=10, choices=Purpose.choices, default=Purpose.SKILL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class SuiteVersion(models.Model):
    """One immutable set of tasks and examples. ``locked_at`` is set when a run first uses
    it; after that its tasks and examples are never changed (a new version is uploaded)."""

    suite = models.ForeignKey(Suite, on_delete=models.PROTECT, related_name="versions")
    number = models.PositiveIntegerField()
    source_sha256 = models.CharField(max_length=64)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    locked_at = models.DateTimeField(null=True, blank=True)
    is_current = models.BooleanField(default=True)

    class Meta:
        ordering = ["suite", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["suite", "number"], name="suite_version_number"),
            # selectors.current_suite_versions(): one current version per suite.
            models.UniqueConstraint(
                fields=["suite"], condition=Q(is_current=True), name="one_current_suite_version"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.suite.slug} v{self.number}"


class Task(models.Model):
    """A skill within a suite version: a prompt template and a metric."""

    class Metric(models.TextChoices):
        EXACT_MATCH = "exact_match", "Exact match after normalisation"
        CONTAINS = "contains", "Answer contains the target"
        MULTIPLE_CHOICE = "multiple_choice", "Multiple choice by log-likelihood"
        MEAN_LOGLIK = "mean_loglik", "Mean log-likelihood of the reference"
        PARTS = "parts", "Share of the target's parts (one a line) in the answer"

    suite_version = models.ForeignKey(SuiteVersion, on_delete=models.PROTECT, related_name="tasks")
    slug = models.SlugField(max_length=64)
    title = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    tags = models.JSONField(
        default=list, help_text="Adapters whose task_tags meet these target it."
    )
    metric = models.CharField(max_length=20, choices=Metric.choices)
    prompt_template = models.TextField(help_text="str.format template over the example's fields.")
    max_new_tokens = models.PositiveSmallIntegerField(default=16)

    class Meta:
        ordering = ["suite_version", "slug"]
        constraints = [
            models.UniqueConstraint(fields=["suite_version", "slug"], name="task_slug_per_version"),
        ]

    def __str__(self) -> str:
        return f"{self.suite_version}/{self.slug}"


class Example(models.Model):
    """One example. Hidden and paraphrase ones are never shown or returned by any page or
    API.

    The paraphrase split asks the task's question in wordings that no public example,
    training file or adapter's example prompt uses, so that routing and scores are not
    judged only on the templates adapters were trained on. Its examples carry their own
    ``prompt_template`` (the task's template appends an answer-format line that these
    prompts must not have); public and hidden examples leave it blank and use the task's.
    """

    class Split(models.TextChoices):
        PUBLIC = "public", "Public"
        HIDDEN = "hidden", "Hidden"
        PARAPHRASE = "paraphrase", "Paraphrase (hidden)"

    task = models.ForeignKey(Task, on_delete=models.PROTECT, related_name="examples")
    split = models.CharField(max_length=10, choices=Split.choices)
    position = models.PositiveIntegerField()
    fields = models.JSONField(help_text="Values for the task's prompt template.")
    prompt_template = models.TextField(
        blank=True,
        default="",
        help_text="This example's own template (paraphrase examples); blank: the task's.",
    )
    target = models.TextField()
    choices = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["task", "split", "position"]
        constraints = [
            models.UniqueConstraint(
                fields=["task", "split", "position"], name="example_position_per_split"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.task} {self.split} #{self.position}"

    @property
    def template(self) -> str:
        """The template this example's prompt is rendered with."""
        return self.prompt_template or self.task.prompt_template


class EvaluationRun(models.Model):
    """One evaluation of one adapter version, executed by one Celery task per run id."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Finished"
        FAILED = "failed", "Failed"

    version = models.ForeignKey(
        AdapterVersion, on_delete=models.CASCADE, related_name="evaluation_runs"
    )
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    queue = models.CharField(max_length=16)
    attempts = models.PositiveSmallIntegerField(default=0)
    max_attempts = models.PositiveSmallIntegerField(default=2)
    claimed_by = models.CharField(max_length=200, blank=True, help_text="host:pid of the worker.")
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(
        null=True, blank=True, help_text="When the run's task message was last sent."
    )
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    deadline_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    progress_done = models.PositiveIntegerField(default=0)
    progress_total = models.PositiveIntegerField(default=0)
    progress_label = models.CharField(max_length=200, blank=True)
    failure_code = models.CharField(max_length=64, blank=True)
    failure_reason = models.TextField(blank=True)
    log = models.TextField(blank=True)
    passed = models.BooleanField(null=True, blank=True, help_text="The admission rules' verdict.")
    needs_review = models.BooleanField(default=False)
    duration_seconds = models.FloatField(null=True, blank=True)
    alone = models.BooleanField(
        default=False,
        help_text="Evaluated in a child of its own: a group it was in failed as a whole.",
    )
    infra_retries = models.PositiveSmallIntegerField(
        default=0, help_text="Times a platform fault (not the adapter) sent it back to the queue."
    )
    retry_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Re-queued after a platform fault: not claimed, nor sent, before this.",
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            # One live run per version: never two evaluations (or admissions) of one upload.
            models.UniqueConstraint(
                fields=["version"],
                condition=Q(status__in=["queued", "running"]),
                name="one_live_run_per_version",
            ),
            models.CheckConstraint(
                condition=Q(progress_done__lte=models.F("progress_total")) | Q(progress_total=0),
                name="run_progress_within_total",
            ),
        ]
        indexes = [
            # The reaper: running runs past their deadline or with a stale heartbeat.
            models.Index(
                fields=["deadline_at"], condition=Q(status="running"), name="run_running_idx"
            ),
            # The reaper: queued runs whose message was sent long ago (it may be lost).
            models.Index(fields=["sent_at"], condition=Q(status="queued"), name="run_queued_idx"),
            # The reaper: runs waiting out their back-off after a platform fault.
            models.Index(
                fields=["retry_at"],
                condition=Q(status="queued", retry_at__isnull=False),
                name="run_retry_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"run {self.pk} of {self.version}"


class TaskResult(models.Model):
    """Scores of base and base+adapter on one task and split, with a bootstrap 95% CI of
    the difference (adapter - base)."""

    class Split(models.TextChoices):
        HIDDEN = "hidden", "Hidden (decides admission)"
        PUBLIC = "public", "Public"
        PARAPHRASE = "paraphrase", "Paraphrase (hidden)"

    run = models.ForeignKey(EvaluationRun, on_delete=models.CASCADE, related_name="task_results")
    task = models.ForeignKey(Task, on_delete=models.PROTECT, related_name="+")
    split = models.CharField(max_length=10, choices=Split.choices, default=Split.HIDDEN)
    is_target = models.BooleanField(help_text="False for the general suite's tasks.")
    n = models.PositiveIntegerField()
    base_score = models.FloatField()
    adapter_score = models.FloatField()
    delta = models.FloatField()
    ci_low = models.FloatField()
    ci_high = models.FloatField()

    class Meta:
        ordering = ["run", "-is_target", "task__slug"]
        constraints = [
            models.UniqueConstraint(fields=["run", "task", "split"], name="one_result_per_task"),
        ]

    def __str__(self) -> str:
        return f"{self.task} on run {self.run_id}: {self.delta:+.3f}"


class BaseScore(models.Model):
    """The base model's per-example scores on a task split, cached per (base model, task):
    a task belongs to one immutable suite version, so this is per suite version too."""

    base_model = models.ForeignKey(BaseModel, on_delete=models.CASCADE, related_name="+")
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="+")
    split = models.CharField(max_length=10, choices=Example.Split.choices)
    scores = models.JSONField(help_text="Per-example scores in example order.")
    mean = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["base_model", "task", "split"], name="one_base_score_per_task"
            ),
        ]

    def __str__(self) -> str:
        return f"base {self.task} {self.split}: {self.mean:.3f}"


class RuleResult(models.Model):
    """One admission rule's verdict on a run, in words and numbers."""

    run = models.ForeignKey(EvaluationRun, on_delete=models.CASCADE, related_name="rule_results")
    rule = models.CharField(max_length=64)
    passed = models.BooleanField()
    detail = models.TextField()
    values = models.JSONField(default=dict)

    class Meta:
        ordering = ["run", "id"]
        constraints = [
            models.UniqueConstraint(fields=["run", "rule"], name="one_verdict_per_rule"),
        ]

    def __str__(self) -> str:
        return f"{self.rule}: {'passed' if self.passed else 'failed'}"


class ReviewDecision(models.Model):
    """A maintainer's decision on a version, with its mandatory reason."""

    class Decision(models.TextChoices):
        APPROVE = "approve", "Approve"
        REJECT = "reject", "Reject"
        SUSPEND = "suspend", "Suspend"

    version = models.ForeignKey(
        AdapterVersion, on_delete=models.CASCADE, related_name="review_decisions"
    )
    maintainer = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT)
    decision = models.CharField(max_length=8, choices=Decision.choices)
    reason = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=~Q(reason=""), name="review_reason_required"),
        ]

    def __str__(self) -> str:
        return f"{self.decision} {self.version}"


class Appeal(models.Model):
    """A contributor's one appeal against a rejection; it puts the version back in review."""

    version = models.OneToOneField(AdapterVersion, on_delete=models.CASCADE, related_name="appeal")
    contributor = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT)
    message = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=~Q(message=""), name="appeal_message_required"),
        ]

    def __str__(self) -> str:
        return f"appeal of {self.version}"


class ContributorTestSet(models.Model):
    """A contributor's own public test set for an adapter. Scored and shown, never used for
    admission."""

    adapter = models.ForeignKey(Adapter, on_delete=models.CASCADE, related_name="test_sets")
    name = models.CharField(max_length=100)
    metric = models.CharField(max_length=20, choices=Task.Metric.choices)
    prompt_template = models.TextField(default="{prompt}")
    max_new_tokens = models.PositiveSmallIntegerField(default=32)
    examples = models.JSONField(help_text="[{fields, target, choices}] as uploaded.")
    source_sha256 = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["adapter", "name"], name="test_set_name_per_adapter"),
        ]

    def __str__(self) -> str:
        return f"{self.adapter}/{self.name}"


class TestSetResult(models.Model):
    run = models.ForeignKey(
        EvaluationRun, on_delete=models.CASCADE, related_name="test_set_results"
    )
    test_set = models.ForeignKey(ContributorTestSet, on_delete=models.CASCADE, related_name="+")
    n = models.PositiveIntegerField()
    base_score = models.FloatField()
    adapter_score = models.FloatField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run", "test_set"], name="one_result_per_test_set"),
        ]

    def __str__(self) -> str:
        return f"{self.test_set} on run {self.run_id}"


class RoutingSignature(models.Model):
    """The router's picture of a version: the normalised centroid of the embeddings of its
    example prompts and of its targeted tasks' public prompts."""

    version = models.OneToOneField(
        AdapterVersion, on_delete=models.CASCADE, related_name="routing_signature"
    )
    embedding_model = models.CharField(max_length=200)
    vector = models.JSONField()
    prompt_count = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"signature of {self.version}"


class WeightSketch(models.Model):
    """A fixed random projection of a version's LoRA weight deltas (B·A per module), to flag
    uploads nearly identical to an admitted adapter (redundant or copied contributions)."""

    version = models.OneToOneField(
        AdapterVersion, on_delete=models.CASCADE, related_name="weight_sketch"
    )
    vector = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"sketch of {self.version}"


class Outcome(models.Model):
    """One model's score on one benchmark example, measured once: decoding is greedy and
    deterministic, so (model, example) → score never changes. ``version`` null: the base
    model alone. The scoreboard and the marginal-contribution rule are computed from these
    and the router's decisions, without generating again."""

    base_model = models.ForeignKey(BaseModel, on_delete=models.CASCADE, related_name="+")
    version = models.ForeignKey(
        AdapterVersion, on_delete=models.CASCADE, null=True, blank=True, related_name="outcomes"
    )
    example = models.ForeignKey(Example, on_delete=models.CASCADE, related_name="outcomes")
    score = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["version", "example"],
                condition=Q(version__isnull=False),
                name="outcome_version_example_uniq",
            ),
            models.UniqueConstraint(
                fields=["base_model", "example"],
                condition=Q(version__isnull=True),
                name="outcome_base_example_uniq",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.version or 'base'} on example {self.example_id}: {self.score}"
