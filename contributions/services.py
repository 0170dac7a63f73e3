"""Writes for contributions. Every state change of a version goes through
``adapter_version_transition`` (compare-and-set + AuditEvent)."""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, Group, Permission
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.db.models import Max, Q
from django.utils import timezone

from contributions import selectors
from contributions.intake import IntakeLimits, UploadPart, ValidatedAdapter, validate_upload
from contributions.licenses import LICENSES
from contributions.models import (
    MAX_REQUESTS_PER_MINUTE,
    Adapter,
    AdapterVersion,
    ApiToken,
    AuditEvent,
    Contributor,
)
from tessera.errors import DomainError

Status = AdapterVersion.Status

# to-status -> the statuses a version may leave for it. Anything else is a conflict.
TRANSITIONS: dict[str, frozenset[str]] = {
    Status.VALIDATED: frozenset({Status.UPLOADED}),
    Status.QUEUED: frozenset({Status.VALIDATED, Status.EVALUATING}),
    Status.EVALUATING: frozenset({Status.QUEUED}),
    # REJECTED -> PASSED: the contributor's one appeal puts a rejection back in review.
    Status.PASSED: frozenset({Status.EVALUATING, Status.REJECTED}),
    Status.FAILED: frozenset({Status.QUEUED, Status.EVALUATING}),
    Status.ADMITTED: frozenset({Status.PASSED, Status.SUSPENDED}),
    Status.REJECTED: frozenset({Status.PASSED}),
    Status.SUSPENDED: frozenset({Status.PASSED, Status.ADMITTED}),
    Status.WITHDRAWN: frozenset(
        {
            Status.UPLOADED,
            Status.VALIDATED,
            Status.QUEUED,
            Status.EVALUATING,
            Status.PASSED,
            Status.FAILED,
            Status.ADMITTED,
            Status.REJECTED,
            Status.SUSPENDED,
        }
    ),
}


@dataclass(frozen=True)
class VersionTransition:
    """What a transition listener is told. ``batched``: the caller makes several changes
    and acts once for all of them afterwards (a rollback publishes one mixture)."""

    version: AdapterVersion
    from_status: str
    to_status: str
    actor: AbstractBaseUser | None
    reason: str
    batched: bool = False


TransitionListener = Callable[[VersionTransition], None]

# Who acts on a status change, in order: evaluation queues a validated version's run,
# routing publishes a mixture when a version enters or leaves ``admitted``. The apps above
# contributions append themselves here in their AppConfig.ready(), so contributions imports
# neither of them. Each listener runs inside the transition's transaction: if it raises,
# the transition is rolled back with it.
on_version_transition: list[TransitionListener] = []


def version_transition_listen(listener: TransitionListener) -> None:
    """Register ``listener`` once (ready() may run more than once, e.g. in tests)."""
    if listener not in on_version_transition:
        on_version_transition.append(listener)


MIN_EXAMPLE_PROMPTS = 3
MAX_EXAMPLE_PROMPTS = 50
MAX_PROMPT_CHARS = 2000
MAX_TAGS = 20


# --- Contributors and tokens -----------------------------------------------------------


def contributor_sign_up(
    *,
    username: str,
    email: str,
    password: str,
    display_name: str,
    affiliation: str = "",
    is_public: bool = True,
) -> Contributor:
    User = get_user_model()
    with transaction.atomic():
        if User.objects.filter(username__iexact=username).exists():
            raise DomainError("username_taken", "That username is already taken.", kind="conflict")
        user = User.objects.create_user(username=username, email=email, password=password)
        return Contributor.objects.create(
            user=user,
            display_name=display_name or username,
            affiliation=affiliation,
            is_public=is_public,
        )


def contributor_ensure(*, user: AbstractBaseUser) -> Contributor:
    """A profile for users created elsewhere (admin, createsuperuser)."""
    contributor, _ = Contributor.objects.get_or_create(
        user=user, defaults={"display_name": user.get_username()}
    )
    return contributor


def contributor_lock(*, user_id: int) -> None:
    """Lock the user's Contributor row until the caller's transaction ends.

    Per-contributor caps (uploads per hour, live evaluations, test sets, API keys) count
    rows and then write one; without a lock, two requests at once would both count N-1 and
    both write. Every such write takes this lock first, so the count it sees is exact.
    """
    rows = Contributor.objects.select_for_update().filter(user_id=user_id)
    if not list(rows.values_list("pk", flat=True)):
        contributor_ensure(user=get_user_model().objects.get(pk=user_id))
        list(rows.values_list("pk", flat=True))


def seconds_until(moment: dt.datetime) -> int:
    """Whole seconds from now until ``moment``, at least 1 (a Retry-After value)."""
    return max(1, math.ceil((moment - timezone.now()).total_seconds()))


# Maintainers read everything in the admin and may correct adapter metadata; versions,
# statuses and the audit trail change only through services, never by editing rows.
MAINTAINER_PERMISSIONS = {
    "contributions": (
        "view_contributor",
        "change_contributor",
        "view_adapter",
        "change_adapter",
        "view_adapterversion",
        "view_auditevent",
        "view_basemodel",
        "view_apitoken",
        "change_apitoken",  # per-key limits only (the admin makes every other field read-only)
    ),
    "evaluation": ("view_", "add_suite", "add_suiteversion"),
    "routing": ("view_",),
}


def maintainer_grant(*, user: AbstractBaseUser) -> None:
    """Make a user a maintainer: the maintainers group (with its admin permissions) and
    access to the admin site. Idempotent; re-running it grants permissions added since."""
    group, _ = Group.objects.get_or_create(name=settings.MAINTAINERS_GROUP)
    wanted = Q()
    for app_label, codenames in MAINTAINER_PERMISSIONS.items():
        for codename in codenames:
            lookup = "codename__startswith" if codename.endswith("_") else "codename"
            wanted |= Q(content_type__app_label=app_label, **{lookup: codename})
    group.permissions.add(*Permission.objects.filter(wanted))
    user.groups.add(group)
    if not user.is_staff:
        user.is_staff = True
        user.save(update_fields=["is_staff"])


def api_token_create(
    *,
    user: AbstractBaseUser,
    name: str,
    requests_per_minute: int | None = None,
    tokens_per_day: int | None = None,
) -> tuple[ApiToken, str]:
    """Create a token; the returned key is the only time the secret exists in clear.

    ``requests_per_minute`` and ``tokens_per_day`` limit the key on the inference API;
    None follows the deployment's default. Contributors may only choose lower limits than
    the default; maintainers may raise them (up to the rate limiter's ceiling).
    """
    name = name.strip()
    if not name:
        raise DomainError("token_name_required", "Give the token a name.")
    _check_token_limits(
        user=user, requests_per_minute=requests_per_minute, tokens_per_day=tokens_per_day
    )
    _check_key_count(user=user)
    for _ in range(5):
        prefix = secrets.token_hex(4)
        secret = secrets.token_urlsafe(32)
        try:
            with transaction.atomic():
                contributor_lock(user_id=user.pk)
                _check_key_count(user=user)
                token = ApiToken.objects.create(
                    user=user,
                    name=name[:100],
                    prefix=prefix,
                    key_hash=_hash_secret(secret),
                    requests_per_minute=requests_per_minute,
                    tokens_per_day=tokens_per_day,
                )
        except IntegrityError:
            continue  # prefix collision: draw again
        return token, f"tsr_{prefix}_{secret}"
    raise DomainError("token_create_failed", "Could not create a token; try again.")


def api_token_revoke(*, token: ApiToken, actor: AbstractBaseUser) -> ApiToken:
    if token.user_id != actor.pk:
        raise DomainError("not_found", "No such token.", kind="not_found")
    ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    token.refresh_from_db()
    return token


def _check_token_limits(
    *, user: AbstractBaseUser, requests_per_minute: int | None, tokens_per_day: int | None
) -> None:
    is_maintainer = selectors.user_is_maintainer(user)
    if requests_per_minute is not None:
        default = settings.TESSERA_API_REQUESTS_PER_MINUTE
        ceiling = MAX_REQUESTS_PER_MINUTE if is_maintainer else default
        if requests_per_minute < 1:
            raise DomainError(
                "requests_per_minute_invalid", "Requests per minute must be at least 1."
            )
        if requests_per_minute > ceiling:
            raise DomainError(
                "requests_per_minute_too_high",
                f"Requests per minute can be at most {ceiling}"
                + ("." if is_maintainer else ", the deployment's default."),
            )
    if tokens_per_day is not None:
        default = settings.TESSERA_API_TOKENS_PER_DAY
        if tokens_per_day < 1:
            raise DomainError("tokens_per_day_invalid", "Tokens per day must be at least 1.")
        # A default of 0 means no quota: any quota a contributor sets is then lower.
        if default and tokens_per_day > default and not is_maintainer:
            raise DomainError(
                "tokens_per_day_too_high",
                f"Tokens per day can be at most {default}, the deployment's default.",
            )


def _check_key_count(*, user: AbstractBaseUser) -> None:
    """At most TESSERA_API_KEYS_PER_USER live keys. Each key has its own requests per minute,
    so without a cap more keys would mean more requests (the daily token quota is also
    counted per user, routing.limits.user_quota_check, so keys never multiply tokens)."""
    limit = settings.TESSERA_API_KEYS_PER_USER
    live = ApiToken.objects.filter(user=user, revoked_at__isnull=True).count()
    if live >= limit:
        raise DomainError(
            "api_key_limit_reached",
            f"You have {live} live API keys, the most allowed is {limit}; revoke one you no "
            "longer use on the API tokens page first.",
            kind="conflict",
            details={"limit": limit, "live": live},
        )


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# --- Adapters ---------------------------------------------------------------------------


def _clean_str_list(value: Iterable[str], *, field: str, max_items: int, max_len: int) -> list:
    items = [str(item).strip() for item in value if str(item).strip()]
    if len(items) > max_items:
        raise DomainError(f"{field}_too_many", f"At most {max_items} {field.replace('_', ' ')}.")
    if any(len(item) > max_len for item in items):
        raise DomainError(
            f"{field}_too_long", f"Each of {field.replace('_', ' ')} is at most {max_len} chars."
        )
    # Keep the contributor's order, drop repeats.
    return list(dict.fromkeys(items))


def _clean_metadata(fields: dict) -> dict:
    cleaned = dict(fields)
    if "license" in cleaned and cleaned["license"] not in LICENSES:
        raise DomainError(
            "license_unknown",
            f"License must be one of: {', '.join(sorted(LICENSES))}.",
        )
    if "task_tags" in cleaned:
        cleaned["task_tags"] = [
            t.lower()
            for t in _clean_str_list(
                cleaned["task_tags"], field="task_tags", max_items=MAX_TAGS, max_len=40
            )
        ]
    if "languages" in cleaned:
        cleaned["languages"] = _clean_str_list(
            cleaned["languages"], field="languages", max_items=MAX_TAGS, max_len=16
        )
    if "example_prompts" in cleaned:
        prompts = _clean_str_list(
            cleaned["example_prompts"],
            field="example_prompts",
            max_items=MAX_EXAMPLE_PROMPTS,
            max_len=MAX_PROMPT_CHARS,
        )
        if len(prompts) < MIN_EXAMPLE_PROMPTS:
            raise DomainError(
                "example_prompts_too_few",
                f"Give at least {MIN_EXAMPLE_PROMPTS} different example prompts: the router "
                "learns from them which requests your adapter should answer.",
            )
        cleaned["example_prompts"] = prompts
    return cleaned


def adapter_create(
    *,
    owner: AbstractBaseUser,
    slug: str,
    title: str,
    license: str,
    intended_use: str,
    training_data_summary: str,
    example_prompts: Sequence[str],
    description: str = "",
    task_tags: Sequence[str] = (),
    languages: Sequence[str] = (),
    visibility: str = Adapter.Visibility.PUBLIC,
) -> Adapter:
    fields = _clean_metadata(
        {
            "slug": slug,
            "title": title,
            "license": license,
            "intended_use": intended_use,
            "training_data_summary": training_data_summary,
            "example_prompts": list(example_prompts),
            "description": description,
            "task_tags": list(task_tags),
            "languages": list(languages),
            "visibility": visibility,
        }
    )
    contributor_ensure(user=owner)
    try:
        with transaction.atomic():
            adapter = Adapter.objects.create(owner=owner, **fields)
            AuditEvent.objects.create(actor=owner, adapter=adapter, action="adapter.created")
    except IntegrityError as exc:
        if Adapter.objects.filter(owner=owner, slug=slug).exists():
            raise DomainError(
                "slug_taken", f"You already have an adapter named '{slug}'.", kind="conflict"
            ) from exc
        raise
    return adapter


EDITABLE_ADAPTER_FIELDS = frozenset(
    {
        "title",
        "description",
        "task_tags",
        "languages",
        "license",
        "intended_use",
        "training_data_summary",
        "example_prompts",
        "visibility",
    }
)


def adapter_update(*, adapter: Adapter, actor: AbstractBaseUser, **changes) -> Adapter:
    unknown = set(changes) - EDITABLE_ADAPTER_FIELDS
    if unknown:
        raise DomainError("field_not_editable", f"Cannot change: {', '.join(sorted(unknown))}.")
    changes = _clean_metadata(changes)
    changed = sorted(k for k, v in changes.items() if getattr(adapter, k) != v)
    if not changed:
        return adapter
    with transaction.atomic():
        for key in changed:
            setattr(adapter, key, changes[key])
        adapter.save(update_fields=[*changed, "updated_at"])
        AuditEvent.objects.create(
            actor=actor, adapter=adapter, action="adapter.updated", reason=", ".join(changed)
        )
    return adapter


# --- Versions ---------------------------------------------------------------------------


def adapter_version_create(
    *, adapter: Adapter, actor: AbstractBaseUser, parts: Sequence[UploadPart]
) -> AdapterVersion:
    """Validate an upload and store it as the adapter's next version, ``validated``; the
    transition's listeners queue its evaluation in the same transaction.

    Validation runs before anything is written; if anything after it fails, the files
    already written are removed again, so a refused upload leaves nothing behind.
    """
    # Counted before validation too, so a contributor over the cap costs no parsing.
    _check_upload_rate(owner_id=adapter.owner_id)
    base_model = selectors.base_model_active()
    validated = validate_upload(
        parts,
        base_model_names=[base_model.name, base_model.source, *base_model.aliases],
        architecture=base_model.architecture,
        limits=IntakeLimits.from_settings(),
    )
    duplicate = selectors.version_by_weights_sha256(validated.weights_sha256)
    if duplicate is not None:
        raise _duplicate_error(duplicate, actor)

    written: list[str] = []
    try:
        with transaction.atomic():
            # The owner's lock makes the caps exact (this one, and the live evaluations the
            # transition's listener counts); the adapter row's gives each upload its number.
            contributor_lock(user_id=adapter.owner_id)
            _check_upload_rate(owner_id=adapter.owner_id)
            Adapter.objects.select_for_update().filter(pk=adapter.pk).first()
            number = (adapter.versions.aggregate(n=Max("number"))["n"] or 0) + 1
            version = AdapterVersion(
                adapter=adapter,
                number=number,
                base_model=base_model,
                status=Status.UPLOADED,
                status_changed_at=timezone.now(),
                **_version_fields(validated),
            )
            _attach_files(version, validated, written)
            version.save()
            AuditEvent.objects.create(
                actor=actor,
                adapter=adapter,
                version=version,
                action="version.uploaded",
                to_status=Status.UPLOADED,
            )
            version = adapter_version_transition(
                version=version,
                to_status=Status.VALIDATED,
                actor=None,
                reason="Intake checks passed: format, safety, config and every tensor shape.",
            )
    except BaseException as exc:
        for name in written:
            default_storage.delete(name)
        if isinstance(exc, IntegrityError):
            duplicate = selectors.version_by_weights_sha256(validated.weights_sha256)
            if duplicate is not None:
                raise _duplicate_error(duplicate, actor) from exc
        raise
    return version


UPLOAD_WINDOW = dt.timedelta(hours=1)


def _check_upload_rate(*, owner_id: int) -> None:
    """At most TESSERA_UPLOADS_PER_HOUR stored uploads per contributor in any hour.

    Counted from the versions themselves, so the count is exact and the same for every
    process (the API's per-process throttle is only a first line); refused uploads store
    nothing and so never count. Each upload costs an evaluation run on the workers, which
    is what this shares fairly.
    """
    limit = settings.TESSERA_UPLOADS_PER_HOUR
    since = timezone.now() - UPLOAD_WINDOW
    recent = AdapterVersion.objects.filter(adapter__owner_id=owner_id, created_at__gt=since)
    count = recent.count()
    if count < limit:
        return
    # A slot frees when the upload that brings the count below the limit leaves the hour.
    frees = recent.order_by("-created_at").values_list("created_at", flat=True)[limit - 1]
    retry_after = seconds_until(frees + UPLOAD_WINDOW)
    raise DomainError(
        "upload_rate_limited",
        f"You have uploaded {count} versions in the last hour, the most allowed is {limit}; "
        f"try again in {math.ceil(retry_after / 60)} minute(s).",
        kind="rate_limited",
        details={"limit": limit, "window_seconds": 3600, "retry_after": retry_after},
        retry_after=retry_after,
    )


def _duplicate_error(duplicate: AdapterVersion, actor: AbstractBaseUser) -> DomainError:
    where = (
        f" ({duplicate.adapter.slug} v{duplicate.number})"
        if duplicate.adapter.owner_id == actor.pk
        else ""
    )
    return DomainError(
        "duplicate_upload",
        f"These exact weights were already uploaded{where}; upload a new training run instead.",
        kind="conflict",
    )


def _version_fields(validated: ValidatedAdapter) -> dict:
    return {
        "config_sha256": validated.config_sha256,
        "weights_sha256": validated.weights_sha256,
        "card_sha256": validated.card_sha256,
        "size_bytes": validated.size_bytes,
        "rank": validated.rank,
        "alpha": validated.alpha,
        "dropout": validated.dropout,
        "target_modules": validated.target_modules,
        "dtype": validated.dtype,
        "tensor_count": validated.tensor_count,
        "parameter_count": validated.parameter_count,
        "adapter_config": validated.normalised_config,
    }


def _attach_files(version: AdapterVersion, validated: ValidatedAdapter, written: list) -> None:
    files = [
        ("config_file", "adapter_config.json", validated.config_bytes),
        ("weights_file", "adapter_model.safetensors", validated.weights_bytes),
    ]
    if validated.card_bytes is not None:
        files.append(("card_file", "README.md", validated.card_bytes))
    for field, name, data in files:
        getattr(version, field).save(name, ContentFile(data), save=False)
        written.append(getattr(version, field).name)


def adapter_version_transition(
    *,
    version: AdapterVersion,
    to_status: str,
    actor: AbstractBaseUser | None,
    reason: str = "",
    action: str = "",
    batched: bool = False,
) -> AdapterVersion:
    """Move a version to ``to_status`` if, and only if, it is still where the caller saw it.

    The update is a compare-and-set on (pk, status): of two workers or maintainers acting
    on the same version at once, exactly one wins; the other gets a ``status_conflict``.
    Then every listener in ``on_version_transition`` is called, in the same transaction
    (``batched=True`` tells them the caller acts once for many changes).
    """
    allowed_from = TRANSITIONS.get(to_status)
    if allowed_from is None:
        raise DomainError("status_unknown", f"Unknown status '{to_status}'.")
    from_status = version.status
    if from_status not in allowed_from:
        raise DomainError(
            "status_conflict",
            f"A version that is {from_status} cannot become {to_status}.",
            kind="conflict",
            details={"from": from_status, "to": to_status},
        )
    now = timezone.now()
    previous_changed_at = version.status_changed_at
    with transaction.atomic():
        updated = AdapterVersion.objects.filter(pk=version.pk, status=from_status).update(
            status=to_status, status_changed_at=now
        )
        if updated != 1:
            raise DomainError(
                "status_conflict",
                "The version changed while you were acting on it; reload and try again.",
                kind="conflict",
            )
        AuditEvent.objects.create(
            actor=actor,
            adapter_id=version.adapter_id,
            version=version,
            action=action or f"version.{to_status}",
            from_status=from_status,
            to_status=to_status,
            reason=reason,
        )
        version.status = to_status
        version.status_changed_at = now
        event = VersionTransition(
            version=version,
            from_status=from_status,
            to_status=to_status,
            actor=actor,
            reason=reason,
            batched=batched,
        )
        try:
            for listener in list(on_version_transition):
                listener(event)
        except BaseException:
            version.status, version.status_changed_at = from_status, previous_changed_at
            raise
    return version


def adapter_version_withdraw(
    *, version: AdapterVersion, actor: AbstractBaseUser, reason: str = ""
) -> AdapterVersion:
    """The contributor takes a version back; effective at once, whatever its state."""
    if version.adapter.owner_id != actor.pk:
        raise DomainError(
            "not_owner", "Only the adapter's owner can withdraw a version.", kind="forbidden"
        )
    if version.status == Status.WITHDRAWN:
        raise DomainError(
            "already_withdrawn", "This version is already withdrawn.", kind="conflict"
        )
    return adapter_version_transition(
        version=version,
        to_status=Status.WITHDRAWN,
        actor=actor,
        reason=reason.strip() or "Withdrawn by its contributor.",
    )
