"""What drf-spectacular cannot work out from the REST views alone.

drf-spectacular finds an extension by its class having been defined, so this module must be
imported before a schema is generated: the settings name ``register_extensions`` as a
preprocessing hook, which imports it on every generation (the served schema, ``manage.py
spectacular`` and the ``check`` that validates the schema).
"""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiTokenScheme(OpenApiAuthenticationExtension):
    """``Authorization: Bearer tsr_<prefix>_<secret>``, a key made on the portal's tokens page."""

    target_class = "contributions.authentication.ApiTokenAuthentication"
    name = "apiToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "tsr_<prefix>_<secret>",
            "description": "An API token made on the portal's tokens page.",
        }


def register_extensions(endpoints):
    """A preprocessing hook that changes nothing: importing this module registers the
    extensions above before the schema is generated."""
    return endpoints
