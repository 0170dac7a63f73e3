"""The playground's form: every field the inference request is built from, checked here.

The request body is made from ``cleaned_data`` alone, so nothing a visitor sends reaches the
inference server unless it is one of these fields, within these bounds.
"""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.core.validators import RegexValidator

from contributions.portal.forms import PortalForm

PROMPT_MAX_CHARS = 4000
DEFAULT_MAX_TOKENS = 128
# A stream holds a portal worker for its whole length (gunicorn's sync workers), so answers
# are kept shorter than the inference API itself would allow.
MAX_TOKENS_CAP = 256
K_MAX = 16
MIXTURE_MODEL = "tessera"

# The names routing.router.ROUTERS and routing.compose.METHODS register, repeated because
# importing those modules loads torch into the portal process; a test keeps them equal.
ROUTERS = ("best", "embedding", "learned", "arrow", "explicit")
COMPOSITIONS = ("top1", "topk", "arrow", "logit", "merged")

ROUTER_CHOICES = [("", "Mixture default")] + [(name, name) for name in ROUTERS]
COMPOSITION_CHOICES = [("", "Deployment default")] + [(m, m) for m in COMPOSITIONS]

# "tessera", "base", "tessera-merged", or one adapter: "owner/slug", optionally "@v<n>".
MODEL_VALIDATOR = RegexValidator(
    r"^(?:[A-Za-z0-9_.-]{1,100}|[A-Za-z0-9_.@+-]{1,150}/[A-Za-z0-9_-]{1,100}(?:@v[0-9]{1,9})?)$",
    "Choose a model from the list.",
)


def max_tokens_cap() -> int:
    return min(MAX_TOKENS_CAP, settings.TESSERA_SERVING_MAX_TOKENS)


class PlaygroundForm(PortalForm):
    prompt = forms.CharField(
        max_length=PROMPT_MAX_CHARS,
        widget=forms.Textarea(attrs={"rows": 4, "spellcheck": "true"}),
        help_text=f"Up to {PROMPT_MAX_CHARS} characters. Ctrl+Enter sends it.",
    )
    model = forms.CharField(
        max_length=260,
        required=False,
        validators=[MODEL_VALIDATOR],
        label="Model",
        help_text="The routed mixture, the base model alone, or one adapter.",
        widget=forms.Select,
    )
    router = forms.ChoiceField(choices=ROUTER_CHOICES, required=False)
    composition = forms.ChoiceField(
        choices=COMPOSITION_CHOICES,
        required=False,
        help_text="How the mixture combines the adapters the router picked.",
    )
    k = forms.IntegerField(
        min_value=1,
        max_value=K_MAX,
        required=False,
        label="k",
        help_text=f"Adapters combined by topk, arrow and logit (1 to {K_MAX}).",
    )

    def __init__(self, *args, models: list[dict] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Built here, not on the class: the cap follows the serving setting, which tests and
        # deployments may change after import.
        cap = max_tokens_cap()
        self.fields["max_tokens"] = forms.IntegerField(
            min_value=1,
            max_value=cap,
            required=False,
            initial=min(DEFAULT_MAX_TOKENS, cap),
            label="Max tokens",
            help_text=f"Length of the answer in tokens, at most {cap}.",
        )
        self.fields["model"].widget.choices = model_choices(models)

    def clean_model(self) -> str:
        return self.cleaned_data["model"] or MIXTURE_MODEL

    def request_body(self, *, stream: bool) -> dict:
        """The chat completion request, from the validated fields only."""
        data = self.cleaned_data
        extension = {
            "router": data["router"] or None,
            "composition": data["composition"] or None,
            "k": data["k"],
        }
        body: dict = {
            "model": data["model"],
            "messages": [{"role": "user", "content": data["prompt"]}],
            "max_tokens": data["max_tokens"] or self.fields["max_tokens"].initial,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        extension = {name: value for name, value in extension.items() if value is not None}
        if extension:
            body["tessera"] = extension
        return body

    def error_message(self) -> str:
        """Every problem in one sentence per field, for the streaming endpoint's 400."""
        parts = []
        for name, errors in self.errors.items():
            label = self.fields[name].label if name in self.fields else None
            label = label or name.replace("_", " ").capitalize()
            parts.append(f"{label}: {' '.join(errors)}")
        return " ".join(parts)


def model_choices(models: list[dict] | None) -> list[tuple]:
    """The select's options from the inference API's /v1/models: the mixture, the base and
    merged models, then the adapters grouped; only the mixture when the list is unknown."""
    choices: list[tuple] = [(MIXTURE_MODEL, "The mixture (routed)")]
    adapters = []
    for entry in models or []:
        kind = (entry.get("tessera") or {}).get("kind")
        model_id = str(entry.get("id", ""))
        if kind == "base":
            choices.append((model_id, "The base model alone"))
        elif kind == "merged":
            choices.append((model_id, "The merged adapter"))
        elif kind == "adapter":
            title = (entry.get("tessera") or {}).get("title") or model_id
            adapters.append((model_id, f"{title} ({model_id})"))
    if adapters:
        choices.append(("One adapter", adapters))
    return choices
