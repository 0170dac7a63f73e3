"""The server-rendered portal. Views are thin: a form checks the input, a service writes,
a selector (or contributions.portal.queries) reads, a template renders.

Access: someone else's adapter is a 404, exactly as if it did not exist; maintainers may
look at every adapter but only its owner may change it (403 for anyone else).
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_POST

from contributions import auth_throttle, selectors, services
from contributions.models import Adapter
from contributions.portal import queries
from contributions.portal.forms import (
    AdapterEditForm,
    AdapterForm,
    SignUpForm,
    UploadForm,
    WithdrawForm,
)
from contributions.upload_handlers import upload_limit_bytes
from tessera.api import STATUS_BY_KIND
from tessera.errors import DomainError

# --- helpers ----------------------------------------------------------------------------


def _form_status(form) -> int:
    return 400 if form.is_bound and form.errors else 200


def _visible_adapter(request: HttpRequest, adapter_id: int) -> Adapter:
    try:
        return selectors.adapter_get_visible(user=request.user, adapter_id=adapter_id)
    except DomainError as exc:
        if exc.kind == "not_found":
            raise Http404(exc.message) from exc
        raise


def _owned_adapter(request: HttpRequest, adapter_id: int) -> Adapter:
    adapter = _visible_adapter(request, adapter_id)
    if adapter.owner_id != request.user.pk:
        raise PermissionDenied("Only the adapter's owner can change it.")
    return adapter


# --- public pages -----------------------------------------------------------------------


def home(request: HttpRequest) -> HttpResponse:
    return render(request, "portal/home.html", {"base_model": queries.base_model_or_none()})


def rules(request: HttpRequest) -> HttpResponse:
    return render(request, "portal/rules.html", {"rules": queries.intake_rules()})


def _throttled(response: HttpResponse, refusal: DomainError) -> HttpResponse:
    response.status_code = 429
    response["Retry-After"] = str(refusal.retry_after)
    return response


def signup(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect("portal:dashboard")
    form = SignUpForm(request.POST if request.method == "POST" else None)
    refusal = (
        auth_throttle.signup_refusal(ip=auth_throttle.client_ip(request)) if form.is_bound else None
    )
    if refusal is not None:
        # Nothing is validated or stored: the form comes back with what was typed.
        context = {"form": SignUpForm(initial=_signup_initial(request)), "throttled": refusal}
        return _throttled(render(request, "portal/signup.html", context), refusal)
    if form.is_bound and form.is_valid():
        try:
            contributor = services.contributor_sign_up(**form.service_kwargs())
        except DomainError as exc:
            form.add_domain_error(exc)
        else:
            login(request, contributor.user, backend="django.contrib.auth.backends.ModelBackend")
            messages.success(request, f"Welcome, {contributor.display_name}. You are signed in.")
            return redirect("portal:dashboard")
    return render(request, "portal/signup.html", {"form": form}, status=_form_status(form))


def _signup_initial(request: HttpRequest) -> dict:
    return {
        name: request.POST.get(name, "")
        for name in SignUpForm.base_fields
        if "password" not in name
    }


class LoginView(auth_views.LoginView):
    """Django's log-in, throttled per client IP and per username (contributions.auth_throttle).

    A throttled attempt is answered before the password is checked, so a guesser learns
    nothing from it, and with a 429 and a Retry-After, so a script knows to stop.
    """

    template_name = "registration/login.html"
    redirect_authenticated_user = True

    def post(self, request: HttpRequest, *args, **kwargs) -> HttpResponse:
        username = request.POST.get("username", "")
        refusal = auth_throttle.login_refusal(
            ip=auth_throttle.client_ip(request), username=username
        )
        if refusal is None:
            return super().post(request, *args, **kwargs)
        form = self.get_form_class()(request, initial={"username": username})
        context = self.get_context_data(form=form, throttled=refusal)
        return _throttled(self.render_to_response(context), refusal)

    def form_valid(self, form):
        auth_throttle.login_succeeded(username=form.cleaned_data.get("username", ""))
        return super().form_valid(form)

    def form_invalid(self, form):
        auth_throttle.login_failed(
            ip=auth_throttle.client_ip(self.request),
            username=self.request.POST.get("username", ""),
        )
        return super().form_invalid(form)


# --- adapters ---------------------------------------------------------------------------


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    context = {"adapters": queries.adapter_list_owned(user=request.user)}
    if selectors.user_is_maintainer(request.user):
        context["all_adapters"] = queries.adapter_list_all(user=request.user)
    return render(request, "portal/dashboard.html", context)


@login_required
def adapter_new(request: HttpRequest) -> HttpResponse:
    form = AdapterForm(request.POST if request.method == "POST" else None)
    status = 200
    if form.is_bound and form.is_valid():
        try:
            adapter = services.adapter_create(owner=request.user, **form.cleaned_data)
        except DomainError as exc:
            form.add_domain_error(exc)
            status = STATUS_BY_KIND[exc.kind]
        else:
            messages.success(request, f"Adapter '{adapter.slug}' created. Upload its files next.")
            return redirect("portal:version-upload", adapter_id=adapter.pk)
    return _adapter_form_page(request, form, None, status)


def _adapter_form_page(request, form, adapter: Adapter | None, status: int) -> HttpResponse:
    context = {"form": form, "adapter": adapter}
    status = max(status, _form_status(form))
    return render(request, "portal/adapter_form.html", context, status=status)


@login_required
def adapter_detail(request: HttpRequest, adapter_id: int) -> HttpResponse:
    adapter = _visible_adapter(request, adapter_id)
    context = {
        "adapter": adapter,
        "is_owner": adapter.owner_id == request.user.pk,
        "version_rows": queries.version_rows(adapter=adapter),
        "adapter_events": queries.adapter_events(adapter=adapter),
        "withdraw_form": WithdrawForm(),
    }
    return render(request, "portal/adapter_detail.html", context)


@login_required
def adapter_edit(request: HttpRequest, adapter_id: int) -> HttpResponse:
    adapter = _owned_adapter(request, adapter_id)
    initial = AdapterEditForm.initial_for(adapter)
    form = AdapterEditForm(request.POST if request.method == "POST" else None, initial=initial)
    status = 200
    if form.is_bound and form.is_valid():
        try:
            services.adapter_update(adapter=adapter, actor=request.user, **form.cleaned_data)
        except DomainError as exc:
            form.add_domain_error(exc)
            status = STATUS_BY_KIND[exc.kind]
        else:
            messages.success(request, "Adapter details saved.")
            return redirect("portal:adapter-detail", adapter_id=adapter.pk)
    return _adapter_form_page(request, form, adapter, status)


# --- versions ---------------------------------------------------------------------------


def _upload_page(request, adapter, form, refusal: DomainError | None = None) -> HttpResponse:
    status = STATUS_BY_KIND[refusal.kind] if refusal else _form_status(form)
    context = {
        "adapter": adapter,
        "form": form,
        "refusal": refusal,
        "rules": queries.intake_rules(),
    }
    response = render(request, "portal/version_upload.html", context, status=status)
    if refusal is not None and refusal.retry_after:
        response["Retry-After"] = str(refusal.retry_after)
    return response


def _upload_too_large(request: HttpRequest) -> bool:
    _ = request.FILES  # parsing the body is what runs the size-capping upload handler
    return getattr(request, "upload_too_large", False)


# CSRF is checked by hand below, after the size check: when the upload handler refuses an
# oversized body by its Content-Length it never reads the body, so the form's CSRF token
# is never seen either, and the middleware would answer a baffling "CSRF failed" instead
# of the 413. A refusal changes nothing, so answering it before the CSRF check is safe.
@csrf_exempt
@login_required
def version_upload(request: HttpRequest, adapter_id: int) -> HttpResponse:
    adapter = _owned_adapter(request, adapter_id)
    if request.method == "POST" and _upload_too_large(request):
        refusal = DomainError(
            "upload_too_large",
            f"The upload is over the {upload_limit_bytes() // (1024 * 1024)} MiB cap.",
            kind="too_large",
        )
        return _upload_page(request, adapter, UploadForm(), refusal)
    return _version_upload_checked(request, adapter)


@csrf_protect
def _version_upload_checked(request: HttpRequest, adapter: Adapter) -> HttpResponse:
    if request.method != "POST":
        return _upload_page(request, adapter, UploadForm())
    form = UploadForm(request.POST, request.FILES)
    if not form.is_valid():
        return _upload_page(request, adapter, form)
    try:
        version = services.adapter_version_create(
            adapter=adapter, actor=request.user, parts=form.parts()
        )
    except DomainError as exc:
        return _upload_page(request, adapter, form, exc)
    messages.success(
        request,
        f"Version {version.number} uploaded: status {version.status}. It passed every intake "
        "check and waits for evaluation.",
    )
    return redirect("portal:adapter-detail", adapter_id=adapter.pk)


@login_required
@require_POST
def version_withdraw(request: HttpRequest, adapter_id: int, number: int) -> HttpResponse:
    adapter = _owned_adapter(request, adapter_id)
    version = next((v for v in adapter.versions.all() if v.number == number), None)
    if version is None:
        raise Http404("No such version.")
    form = WithdrawForm(request.POST)
    reason = form.cleaned_data["reason"] if form.is_valid() else ""
    try:
        services.adapter_version_withdraw(version=version, actor=request.user, reason=reason)
    except DomainError as exc:
        messages.error(request, f"Not withdrawn ({exc.code}): {exc.message}")
    else:
        messages.success(request, f"Version {number} withdrawn. It is no longer served.")
    return redirect("portal:adapter-detail", adapter_id=adapter.pk)
