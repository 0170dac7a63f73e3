"""Fixtures shared by the evaluation tests that need a prepared base model (the tiny
random Llama) and quick evaluation settings; defined with the run tests."""

from tests.evaluation.test_runs import (  # noqa: F401 (fixtures used by name)
    child,
    fast_eval,
    jobs,
    model_cache,
    sent,
    tiny_base_model,
    tiny_model_source,
)
