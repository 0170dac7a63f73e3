"""Fixtures for the command line's tests: the evaluation fixtures (tiny base model, stand-in
child) and the live inference server, from the suites that define them."""

from tests.evaluation.test_runs import (  # noqa: F401 (fixtures used by name)
    child,
    fast_eval,
    model_cache,
    tiny_base_model,
    tiny_model_source,
)
from tests.routing.conftest import (  # noqa: F401 (fixtures used by name)
    api_redis_db,
    no_evaluation,
    server,
    start_server,
)
