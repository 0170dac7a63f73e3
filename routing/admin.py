from django.contrib import admin, messages

from contributions.admin import ReadOnlyAdminMixin
from routing import services
from routing.models import AdapterUsageDaily, KeyUsageDaily, MixtureMember, MixtureVersion
from tessera.errors import DomainError


class MixtureMemberInline(admin.TabularInline):
    model = MixtureMember
    extra = 0
    can_delete = False
    readonly_fields = ["version"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(MixtureVersion)
class MixtureVersionAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Snapshots are immutable; the one thing a maintainer does here is roll back."""

    list_display = ["number", "is_active", "router", "reason", "created_by", "created_at"]
    list_filter = ["is_active", "router"]
    readonly_fields = [f.name for f in MixtureVersion._meta.fields]
    inlines = [MixtureMemberInline]
    actions = ["roll_back"]

    @admin.action(description="Roll back to the selected mixture version", permissions=["view"])
    def roll_back(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one mixture version.", messages.ERROR)
            return
        try:
            new = services.mixture_rollback(mixture=queryset.get(), actor=request.user)
        except DomainError as error:
            self.message_user(request, f"{error.message} ({error.code})", messages.ERROR)
            return
        self.message_user(request, f"Mixture v{new.number} is now active: {new.reason}")


class UsageAdminMixin(ReadOnlyAdminMixin):
    """Usage rows are written only by routing.usage.usage_flush: read-only here."""

    date_hierarchy = "day"
    list_filter = ["day"]


@admin.register(KeyUsageDaily)
class KeyUsageDailyAdmin(UsageAdminMixin, admin.ModelAdmin):
    list_display = ["day", "user", "api_token", "requests", "prompt_tokens", "completion_tokens"]
    list_select_related = ["user", "api_token"]
    search_fields = ["user__username", "api_token__name", "api_token__prefix"]
    readonly_fields = [f.name for f in KeyUsageDaily._meta.fields]


@admin.register(AdapterUsageDaily)
class AdapterUsageDailyAdmin(UsageAdminMixin, admin.ModelAdmin):
    list_display = ["day", "adapter_version", "requests", "prompt_tokens", "completion_tokens"]
    list_select_related = ["adapter_version__adapter__owner"]
    search_fields = ["adapter_version__adapter__slug", "adapter_version__adapter__owner__username"]
    readonly_fields = [f.name for f in AdapterUsageDaily._meta.fields]
