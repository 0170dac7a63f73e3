"""The suite's settings environment, set before Django's settings are first imported.

pytest loads this module as a plugin (``-p tests.support.environment`` in pyproject's pytest
options), before pytest-django imports the settings, so the suite never depends on defaults:
it runs under development settings (DEBUG on, no HTTPS redirect), with a test secret key and
the test suite seed said here. Every process a test starts inherits them. Tests of the
production settings start their own process with their own environment.
"""

from __future__ import annotations

import os

# The built-in suites' secret splits (load_suites, evaluation.suites.complete_suite) are
# drawn from this seed in every test, so that they are the same on every machine and run.
TEST_SUITE_SEED = "tessera-test-suite-seed"
TEST_SECRET_KEY = "tessera-test-secret-key-used-by-the-test-suite-only-0123456789"

os.environ["DJANGO_DEBUG"] = "true"
os.environ["DJANGO_SECRET_KEY"] = TEST_SECRET_KEY
os.environ["TESSERA_SUITE_SEED"] = TEST_SUITE_SEED
