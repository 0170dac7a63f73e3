"""Portal forms: they check the shape of what a person typed; the services check the rules.

A rule the services enforce is repeated here only where the form can say it better next to
the field (a slug's format, the number of example prompts); a DomainError the services
raise anyway is put on the field its code names by ``add_domain_error``.
"""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib.auth import get_user_model, password_validation
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.core.exceptions import ValidationError

from contributions.intake import UploadPart
from contributions.licenses import LICENSE_CHOICES
from contributions.models import SLUG_VALIDATOR, Adapter
from contributions.services import (
    EDITABLE_ADAPTER_FIELDS,
    MAX_EXAMPLE_PROMPTS,
    MAX_PROMPT_CHARS,
    MIN_EXAMPLE_PROMPTS,
)
from tessera.errors import DomainError


class PortalForm(forms.Form):
    """Labels without Django's trailing colon: they read as the field's accessible name."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("label_suffix", "")
        super().__init__(*args, **kwargs)


class DomainErrorMixin:
    """Show a service's refusal on the field its code starts with, else above the form."""

    def add_domain_error(self, exc: DomainError) -> None:
        field = next((name for name in self.fields if exc.code.startswith(name)), None)
        self.add_error(field, f"{exc.message} ({exc.code})")


class SignUpForm(DomainErrorMixin, PortalForm):
    username = forms.CharField(
        max_length=150,
        validators=[UnicodeUsernameValidator()],
        help_text="Letters, digits and @ . + - _ only. You log in with it.",
        widget=forms.TextInput(attrs={"autocomplete": "username", "autofocus": True}),
    )
    email = forms.EmailField(widget=forms.EmailInput(attrs={"autocomplete": "email"}))
    display_name = forms.CharField(
        max_length=100,
        required=False,
        help_text="How you are credited on the leaderboard; your username if left empty.",
    )
    affiliation = forms.CharField(
        max_length=200, required=False, help_text="A lab, company or community; optional."
    )
    is_public = forms.BooleanField(
        required=False,
        initial=True,
        label="Public profile",
        help_text="Show my name on the leaderboard and in answers my adapters helped with.",
    )
    password1 = forms.CharField(
        label="Password",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        help_text=password_validation.password_validators_help_text_html(),
    )
    password2 = forms.CharField(
        label="Password again",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
    )

    def clean(self) -> dict:
        cleaned = super().clean()
        first, second = cleaned.get("password1"), cleaned.get("password2")
        if first and second and first != second:
            self.add_error("password2", "The two passwords differ.")
        elif first:
            # Unsaved: the similarity validator compares the password with these fields.
            user = get_user_model()(
                username=cleaned.get("username", ""), email=cleaned.get("email", "")
            )
            try:
                password_validation.validate_password(first, user)
            except ValidationError as exc:
                self.add_error("password1", exc)
        return cleaned

    def service_kwargs(self) -> dict:
        data = self.cleaned_data
        return {
            "username": data["username"],
            "email": data["email"],
            "password": data["password1"],
            "display_name": data["display_name"],
            "affiliation": data["affiliation"],
            "is_public": data["is_public"],
        }


class CommaListField(forms.CharField):
    """``"qa, math"`` -> ``["qa", "math"]``."""

    def to_python(self, value) -> list[str]:
        text = super().to_python(value)
        return [item.strip() for item in text.split(",") if item.strip()]


class LineListField(forms.CharField):
    """One item a line; blank lines and repeats dropped."""

    def to_python(self, value) -> list[str]:
        text = super().to_python(value)
        return list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))


class AdapterForm(DomainErrorMixin, PortalForm):
    slug = forms.CharField(
        max_length=64,
        validators=[SLUG_VALIDATOR],
        help_text="Lowercase letters, digits and hyphens, e.g. sql-helper. It cannot change.",
    )
    title = forms.CharField(max_length=200)
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}))
    task_tags = CommaListField(
        required=False, label="Task tags", help_text="Comma separated, e.g. math, arithmetic."
    )
    languages = CommaListField(
        required=False, help_text="Comma separated language codes, e.g. en, fr."
    )
    license = forms.ChoiceField(
        choices=[
            ("", "Choose a license…"),
            *((code, f"{code} ({name})") for code, name in LICENSE_CHOICES),
        ],
        help_text="An SPDX identifier; the license the adapter is served under.",
    )
    intended_use = forms.CharField(
        label="Intended use",
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="What the adapter is for, and what it is not for.",
    )
    training_data_summary = forms.CharField(
        label="Training data summary",
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="Where the training data came from and its license.",
    )
    example_prompts = LineListField(
        label="Example prompts",
        widget=forms.Textarea(attrs={"rows": 6}),
        help_text=(
            f"One prompt a line, {MIN_EXAMPLE_PROMPTS} to {MAX_EXAMPLE_PROMPTS}. The router "
            "learns from them which requests your adapter should answer."
        ),
    )
    visibility = forms.ChoiceField(
        choices=Adapter.Visibility.choices,
        initial=Adapter.Visibility.PUBLIC,
        widget=forms.RadioSelect,
    )

    def clean_example_prompts(self) -> list[str]:
        prompts = self.cleaned_data["example_prompts"]
        if len(prompts) < MIN_EXAMPLE_PROMPTS:
            raise ValidationError(
                f"Give at least {MIN_EXAMPLE_PROMPTS} different example prompts "
                f"(you gave {len(prompts)}).",
                code="example_prompts_too_few",
            )
        if len(prompts) > MAX_EXAMPLE_PROMPTS:
            raise ValidationError(
                f"At most {MAX_EXAMPLE_PROMPTS} example prompts (you gave {len(prompts)}).",
                code="example_prompts_too_many",
            )
        if any(len(prompt) > MAX_PROMPT_CHARS for prompt in prompts):
            raise ValidationError(f"Each prompt is at most {MAX_PROMPT_CHARS} characters.")
        return prompts


class AdapterEditForm(AdapterForm):
    slug = None  # An adapter's slug names it in the API and in attributions: it stays.

    @staticmethod
    def initial_for(adapter: Adapter) -> dict:
        initial = {name: getattr(adapter, name) for name in EDITABLE_ADAPTER_FIELDS}
        initial["task_tags"] = ", ".join(adapter.task_tags)
        initial["languages"] = ", ".join(adapter.languages)
        initial["example_prompts"] = "\n".join(adapter.example_prompts)
        return initial


class MultipleFileInput(forms.FileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    """A FileField whose value is the list of every file sent under its name."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("widget", MultipleFileInput())
        super().__init__(**kwargs)

    def clean(self, data, initial=None) -> list:
        files = list(data) if isinstance(data, list | tuple) else [data] if data else []
        if not files:
            if self.required:
                raise ValidationError(self.error_messages["required"], code="required")
            return []
        return [super(MultipleFileField, self).clean(item, initial) for item in files]


class UploadForm(PortalForm):
    files = MultipleFileField(
        label="Adapter files",
        widget=MultipleFileInput(attrs={"accept": ".json,.safetensors,.md,.zip,.gz,.tgz"}),
        help_text=(
            "Select adapter_config.json and adapter_model.safetensors (and README.md if you "
            "have a model card) together, or one .zip or .tar.gz holding them."
        ),
    )

    def parts(self) -> list[UploadPart]:
        return [UploadPart(name=f.name, data=f.read()) for f in self.cleaned_data["files"]]


class WithdrawForm(PortalForm):
    reason = forms.CharField(max_length=1000, required=False)


class TokenCreateForm(DomainErrorMixin, PortalForm):
    """The limits are optional: empty follows the deployment's default. Whether a value may
    exceed the default is the service's rule (maintainers may); its refusal lands on the
    field."""

    name = forms.CharField(
        max_length=100,
        help_text="Where the key will be used, e.g. 'laptop CLI' or 'CI upload job'.",
    )
    requests_per_minute = forms.IntegerField(
        required=False, min_value=1, label="Requests per minute (inference API)"
    )
    tokens_per_day = forms.IntegerField(
        required=False, min_value=1, label="Tokens per day (inference API)"
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        rpm = settings.TESSERA_API_REQUESTS_PER_MINUTE
        self.fields["requests_per_minute"].help_text = (
            f"Optional. Empty: the default, {rpm} a minute. You can choose fewer, "
            "e.g. to cap a script that might loop."
        )
        tpd = settings.TESSERA_API_TOKENS_PER_DAY
        default = f"{tpd:,} prompt and completion tokens a UTC day" if tpd else "no daily quota"
        self.fields[
            "tokens_per_day"
        ].help_text = f"Optional. Empty: the default, {default}. You can choose fewer."
