"""The Django admin for evaluation: maintainers look things up here, and upload a new
version of a benchmark suite (JSONL) from the suites page.

Everything is read-only. Suite versions are immutable and change only through
evaluation.services.suites (the upload form calls it); runs, results, verdicts, review
decisions and appeals change only through their services. Maintainers (the Maintainers
group, or superusers) may read hidden and paraphrase examples here (they are the ones who
write them); other staff see their counts only, whatever view permissions they hold, and
no page outside the admin shows them.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template import engines
from django.urls import path, reverse
from django.utils.html import format_html

from contributions.admin import ReadOnlyAdminMixin
from contributions.selectors import user_is_maintainer
from evaluation.models import (
    Appeal,
    BaseScore,
    ContributorTestSet,
    EvaluationRun,
    Example,
    ReviewDecision,
    RoutingSignature,
    RuleResult,
    Suite,
    SuiteVersion,
    Task,
    TaskResult,
    TestSetResult,
    WeightSketch,
)
from evaluation.services.suites import suite_version_import
from evaluation.suite_io import MAX_SUITE_BYTES
from tessera.errors import DomainError


def _all_fields(model) -> list[str]:
    return [field.name for field in model._meta.fields]


# --- Suites -------------------------------------------------------------------------------------


class SuiteUploadForm(forms.Form):
    file = forms.FileField(
        label="Suite file (JSONL)",
        help_text="One suite per file: a header line, task lines, example lines. A file "
        "identical to the current version changes nothing; otherwise it becomes the next "
        "version.",
    )

    def clean_file(self):
        upload = self.cleaned_data["file"]
        if upload.size > MAX_SUITE_BYTES:
            raise forms.ValidationError(f"The file is over {MAX_SUITE_BYTES // 2**20} MiB.")
        return upload


_UPLOAD_TEMPLATE = engines["django"].from_string(
    """{% extends "admin/base_site.html" %}
{% block content %}
<p>Upload a benchmark suite as JSONL. The built-in suites' public parts live in
<code>evaluation/suites/</code>; <code>python manage.py load_suites</code> imports them with
their hidden splits, drawn from the secret seed or read from private files.</p>
<form method="post" enctype="multipart/form-data">{% csrf_token %}
{{ form.as_p }}
<input type="submit" value="Upload">
</form>
{% endblock %}"""
)


class SuiteVersionInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = SuiteVersion
    extra = 0
    fields = ["number", "is_current", "locked_at", "source_sha256", "created_by", "created_at"]
    readonly_fields = fields
    ordering = ["-number"]
    show_change_link = True


@admin.register(Suite)
class SuiteAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["slug", "title", "purpose", "current_version", "created_at"]
    list_filter = ["purpose"]
    search_fields = ["slug", "title"]
    fields = ["slug", "title", "description", "purpose", "created_at"]
    readonly_fields = fields
    inlines = [SuiteVersionInline]

    @admin.display(description="Current version")
    def current_version(self, suite: Suite) -> str:
        version = suite.versions.filter(is_current=True).first()
        return f"v{version.number}" if version else "—"

    def get_urls(self):
        upload = path(
            "upload/",
            self.admin_site.admin_view(self.upload_view),
            name="evaluation_suite_upload",
        )
        return [upload, *super().get_urls()]

    def changelist_view(self, request: HttpRequest, extra_context=None):
        if user_is_maintainer(request.user):
            url = reverse("admin:evaluation_suite_upload")
            messages.info(
                request, format_html('<a href="{}">Upload a suite version (JSONL)</a>', url)
            )
        return super().changelist_view(request, extra_context)

    def upload_view(self, request: HttpRequest) -> HttpResponse:
        if not user_is_maintainer(request.user):
            raise PermissionDenied
        form = SuiteUploadForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            try:
                result = suite_version_import(
                    jsonl=form.cleaned_data["file"].read(), actor=request.user
                )
            except DomainError as exc:
                form.add_error("file", f"{exc.message} [{exc.code}]")
            else:
                version = result.version
                if result.created:
                    messages.success(
                        request, f"{version.suite.slug} v{version.number} is now current."
                    )
                else:
                    messages.info(
                        request,
                        f"Identical to the current version {version.suite.slug} "
                        f"v{version.number}; nothing changed.",
                    )
                return HttpResponseRedirect(
                    reverse("admin:evaluation_suiteversion_change", args=[version.pk])
                )
        context = {
            **self.admin_site.each_context(request),
            "title": "Upload a suite version",
            "form": form,
            "opts": self.model._meta,
        }
        return HttpResponse(_UPLOAD_TEMPLATE.render(context, request))


class TaskInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = Task
    extra = 0
    fields = ["slug", "title", "metric", "tags", "max_new_tokens", "public", "hidden", "paraphrase"]
    readonly_fields = fields
    show_change_link = True

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                n_public=Count("examples", filter=Q(examples__split="public")),
                n_hidden=Count("examples", filter=Q(examples__split="hidden")),
                n_paraphrase=Count("examples", filter=Q(examples__split="paraphrase")),
            )
        )

    @admin.display(description="Public examples")
    def public(self, task: Task) -> int:
        return task.n_public

    @admin.display(description="Hidden examples")
    def hidden(self, task: Task) -> int:
        return task.n_hidden

    @admin.display(description="Paraphrase examples (hidden)")
    def paraphrase(self, task: Task) -> int:
        return task.n_paraphrase


@admin.register(SuiteVersion)
class SuiteVersionAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["__str__", "is_current", "locked_at", "created_by", "created_at"]
    list_filter = ["is_current", "suite"]
    list_select_related = ["suite", "created_by"]
    fields = [
        "suite",
        "number",
        "is_current",
        "locked_at",
        "source_sha256",
        "created_by",
        "created_at",
    ]
    readonly_fields = fields
    inlines = [TaskInline]


class ExampleInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = Example
    extra = 0
    fields = ["split", "position", "fields", "prompt_template", "target", "choices"]
    readonly_fields = fields
    ordering = ["split", "position"]
    max_num = 0
    classes = ["collapse"]

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        # The same rule as ExampleAdmin: a task page must not show what the example list
        # hides.
        return user_is_maintainer(request.user) and super().has_view_permission(request, obj)


@admin.register(Task)
class TaskAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["slug", "suite_version", "metric", "tags", "max_new_tokens"]
    list_filter = ["metric", "suite_version__suite"]
    search_fields = ["slug", "title"]
    list_select_related = ["suite_version__suite"]
    fields = [
        "suite_version",
        "slug",
        "title",
        "description",
        "tags",
        "metric",
        "prompt_template",
        "max_new_tokens",
    ]
    readonly_fields = fields
    inlines = [ExampleInline]


@admin.register(Example)
class ExampleAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["task", "split", "position", "target"]
    list_filter = ["split", "task__suite_version__suite"]
    list_select_related = ["task__suite_version__suite"]
    fields = ["task", "split", "position", "fields", "prompt_template", "target", "choices"]
    readonly_fields = fields

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        # Hidden and paraphrase examples must stay unseen by contributors: maintainers only,
        # whatever staff permissions.
        return user_is_maintainer(request.user) and super().has_view_permission(request, obj)


# --- Runs and results ---------------------------------------------------------------------------


class TaskResultInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = TaskResult
    extra = 0
    fields = [
        "task",
        "split",
        "is_target",
        "n",
        "base_score",
        "adapter_score",
        "delta",
        "ci_low",
        "ci_high",
    ]
    readonly_fields = fields


class RuleResultInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = RuleResult
    extra = 0
    fields = ["rule", "passed", "detail", "values"]
    readonly_fields = fields


@admin.register(EvaluationRun)
class EvaluationRunAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = [
        "__str__",
        "status",
        "queue",
        "passed",
        "needs_review",
        "attempts",
        "created_at",
    ]
    list_filter = ["status", "queue", "passed", "needs_review", "created_at"]
    search_fields = ["version__adapter__slug", "claimed_by", "failure_code"]
    list_select_related = ["version__adapter"]
    fields = _all_fields(EvaluationRun)
    readonly_fields = fields
    inlines = [TaskResultInline, RuleResultInline]


@admin.register(TaskResult)
class TaskResultAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = [
        "run",
        "task",
        "split",
        "is_target",
        "n",
        "base_score",
        "adapter_score",
        "delta",
    ]
    list_filter = ["split", "is_target"]
    list_select_related = ["run__version__adapter", "task__suite_version__suite"]
    fields = _all_fields(TaskResult)
    readonly_fields = fields


@admin.register(RuleResult)
class RuleResultAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["run", "rule", "passed"]
    list_filter = ["rule", "passed"]
    list_select_related = ["run__version__adapter"]
    fields = _all_fields(RuleResult)
    readonly_fields = fields


@admin.register(BaseScore)
class BaseScoreAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["base_model", "task", "split", "mean", "created_at"]
    list_filter = ["split"]
    list_select_related = ["base_model", "task__suite_version__suite"]
    fields = ["base_model", "task", "split", "mean", "created_at"]
    readonly_fields = fields


@admin.register(ReviewDecision)
class ReviewDecisionAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["version", "decision", "maintainer", "created_at"]
    list_filter = ["decision", "created_at"]
    search_fields = ["version__adapter__slug", "maintainer__username", "reason"]
    list_select_related = ["version__adapter", "maintainer"]
    fields = _all_fields(ReviewDecision)
    readonly_fields = fields


@admin.register(Appeal)
class AppealAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["version", "contributor", "created_at"]
    search_fields = ["version__adapter__slug", "contributor__username", "message"]
    list_select_related = ["version__adapter", "contributor"]
    fields = _all_fields(Appeal)
    readonly_fields = fields


@admin.register(ContributorTestSet)
class ContributorTestSetAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["adapter", "name", "metric", "created_at"]
    list_filter = ["metric"]
    list_select_related = ["adapter"]
    fields = _all_fields(ContributorTestSet)
    readonly_fields = fields


@admin.register(TestSetResult)
class TestSetResultAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["run", "test_set", "n", "base_score", "adapter_score"]
    fields = _all_fields(TestSetResult)
    readonly_fields = fields


@admin.register(RoutingSignature)
class RoutingSignatureAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["version", "embedding_model", "prompt_count", "created_at"]
    list_select_related = ["version__adapter"]
    fields = ["version", "embedding_model", "prompt_count", "created_at"]
    readonly_fields = fields


@admin.register(WeightSketch)
class WeightSketchAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["version", "created_at"]
    list_select_related = ["version__adapter"]
    fields = ["version", "created_at"]
    readonly_fields = fields
