"""How long the fuzzing runs, the same for both APIs: a fixed seed and derandomized
generation (a CI failure replays locally with the same inputs), a bounded number of examples
per operation, and the boundary-value phase only on demand.

    TESSERA_FUZZ_EXAMPLES=500 pytest tests/fuzz    # longer: more examples per operation
    TESSERA_FUZZ_SEED=7 pytest tests/fuzz          # other inputs
    TESSERA_FUZZ_COVERAGE=1 pytest tests/fuzz      # also schemathesis's coverage phase
"""

from __future__ import annotations

import os

from schemathesis.config import SchemathesisConfig

SEED = int(os.environ.get("TESSERA_FUZZ_SEED", "20261202"))
COVERAGE = os.environ.get("TESSERA_FUZZ_COVERAGE", "") not in ("", "0")


def max_examples(default: int) -> int:
    return int(os.environ.get("TESSERA_FUZZ_EXAMPLES", default))


def fuzz_config(*, examples: int) -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "generation": {
                "max-examples": examples,
                "deterministic": True,
                "database": "none",
                # Valid and invalid inputs both: a refusal must be a 4xx too.
                "mode": "all",
            },
            # The coverage phase sends hundreds of boundary cases per operation whatever
            # max-examples says, so CI leaves it out; stateful links are not described.
            "phases": {"coverage": {"enabled": COVERAGE}, "stateful": {"enabled": False}},
        }
    )
