"""The licenses an adapter may carry: a fixed list of SPDX identifiers.

Kept short on purpose: each one is a license maintainers know how to serve under.
"""

LICENSES: dict[str, str] = {
    "Apache-2.0": "Apache License 2.0",
    "MIT": "MIT License",
    "BSD-3-Clause": "BSD 3-Clause License",
    "CC-BY-4.0": "Creative Commons Attribution 4.0",
    "CC-BY-SA-4.0": "Creative Commons Attribution Share Alike 4.0",
    "CC-BY-NC-4.0": "Creative Commons Attribution Non Commercial 4.0",
    "CC0-1.0": "Creative Commons Zero v1.0 Universal",
    "MPL-2.0": "Mozilla Public License 2.0",
    "GPL-3.0-only": "GNU General Public License v3.0 only",
    "LGPL-3.0-only": "GNU Lesser General Public License v3.0 only",
    "OpenRAIL-M": "Open Responsible AI License (model)",
}

LICENSE_CHOICES = sorted(LICENSES.items())
