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
