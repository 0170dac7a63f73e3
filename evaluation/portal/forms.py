"""Forms for the review pages, appeals and test sets. They check the shape of what a person
typed; the services check the rules and refuse with a code, which the form shows next to
the field the refusal names."""

from __future__ import annotations

from django import forms
from django.conf import settings

from contributions.portal.forms import PortalForm
from evaluation.models import Task
from evaluation.services.review import MAX_APPEAL_CHARS, MAX_REASON_CHARS
from evaluation.services.test_sets import MAX_TEST_SET_BYTES
from tessera.errors import DomainError


class ServiceForm(PortalForm):
    """Fields are loose on purpose: an empty or bad value goes to the service, which refuses
    it with its code, so the page and the API say the same thing."""

    def add_domain_error(self, exc: DomainError) -> None:
        field = exc.details.get("field")
        self.add_error(field if field in self.fields else None, f"{exc.message} ({exc.code})")


class DecisionForm(ServiceForm):
    reason = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "maxlength": MAX_REASON_CHARS}),
        help_text="Required. The contributor reads it in an e-mail and on the adapter page.",
    )
    next = forms.CharField(required=False, widget=forms.HiddenInput)


class AppealForm(ServiceForm):
    message = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 4, "maxlength": MAX_APPEAL_CHARS}),
        help_text="Why the decision should change. A rejection can be appealed once.",
    )


class TestSetForm(ServiceForm):
    name = forms.CharField(required=False, help_text="E.g. 'my held-out sums'.")
    # A select to choose from, but any value reaches the service (test_set_metric_unknown).
    metric = forms.CharField(
        required=False,
        widget=forms.Select(choices=[("", "Choose a metric…"), *Task.Metric.choices]),
        help_text="How an answer is scored against the target.",
    )
    file = forms.FileField(
        label="JSONL file",
        required=False,
        allow_empty_file=True,  # the service says test_set_empty
        widget=forms.ClearableFileInput(attrs={"accept": ".jsonl,.json,.txt"}),
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Built per form from the settings, which a deployment (or a test) may change.
        self.fields["file"].help_text = (
            'One example a line: {"prompt": "…", "target": "…"}, plus "choices": [...] for '
            f"multiple_choice. At most {settings.TESSERA_TEST_SET_MAX_EXAMPLES} lines, "
            f"{settings.TESSERA_TEST_SET_EXAMPLE_MAX_CHARS} characters a line and "
            f"{MAX_TEST_SET_BYTES // 1024} KiB; at most {settings.TESSERA_TEST_SETS_PER_ADAPTER} "
            "test sets an adapter."
        )

    def jsonl(self) -> bytes:
        upload = self.cleaned_data.get("file")
        if upload is None:
            raise DomainError(
                "test_set_file_required", "Choose the JSONL file.", details={"field": "file"}
            )
        return upload.read(MAX_TEST_SET_BYTES + 1)  # one byte past the cap is enough to refuse
