"""Where each router sends every task's hidden prompts when only some of the active
mixture's members are admitted: the learned router trained as ``routing.train_router``
trains it (the same public-split outcomes, example prompts and cross-validation, from the
outcomes the database holds), on the members named only, against the embedding router over
the same members. For the question a newcomer asks first: with three demo adapters, do the
prompts of a skill none of them has go to the base model?

Run it on the database of ``make run`` once its scoreboard is done (every outcome it needs
is stored by then; a missing one is measured first, in a sandboxed child):

    DJANGO_DEBUG=true .venv/bin/python benchmarks/bench_learned_subset.py \\
        contributor/metric-units contributor/long-dates contributor/reverse-words

Prints counts per task only: the hidden examples themselves never leave the database.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("members", nargs="+", help="model ids (<owner>/<slug>) to keep")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tessera.settings")
    import django

    django.setup()
    import dataclasses

    import numpy as np

    from contributions.selectors import base_model_active
    from evaluation.services.outcomes import outcomes_table, union_splits
    from routing.learned.fit import fit_best
    from routing.learned.services import training_set
    from routing.router.decision import route_embedded
    from routing.router.learned import route_learned_embedded
    from routing.scoreboard.services import members_of, public_catalog, union_queries
    from routing.selectors import mixture_by_number_or_active

    mixture = mixture_by_number_or_active(None)
    if mixture is None:
        sys.exit("No mixture is published yet.")
    versions = {v.pk: v for v in members_of(mixture)}
    served = public_catalog(mixture, list(versions.values())).adapters
    members = {adapter.model_id: versions[adapter.version_id] for adapter in served}
    unknown = sorted(set(args.members) - set(members))
    if unknown:
        sys.exit(f"Not members of mixture v{mixture.number}: {', '.join(unknown)}")
    # In the mixture's own column order (by version), as the job would train on them.
    kept = sorted((members[name] for name in args.members), key=lambda version: version.pk)
    data, summary = training_set(mixture=mixture)
    narrowed = data.only([v.pk for v in kept])
    fitted = fit_best(narrowed)
    catalog = dataclasses.replace(public_catalog(mixture, kept), learned=fitted.model)
    print(
        f"Mixture v{mixture.number}, kept {len(kept)} of {len(members)} members; learned "
        f"router {fitted.kind} {fitted.params} on {summary['public_examples']} public "
        f"examples and {len(narrowed.owner)} example prompts"
    )
    print("\n| task (hidden) | n | learned router's picks | embedding router's picks |")
    print("|---|---:|---|---|")
    base_model = base_model_active()
    for part in union_splits():
        if part.split != "hidden":
            continue
        queries = np.asarray(union_queries([part]))
        learned = Counter(_name(route_learned_embedded(catalog=catalog, query=q)) for q in queries)
        embedding = Counter(_name(route_embedded(catalog=catalog, query=q)) for q in queries)
        scores = outcomes_table(
            base_model_id=base_model.pk,
            version_ids=[v.pk for v in kept],
            example_ids=part.example_ids,
        )
        solved = {
            name: sum(scores[version].get(pk, 0.0) for pk in part.example_ids)
            for name, version in [("base", None), *((n, members[n].pk) for n in args.members)]
        }
        print(
            f"| {part.task.slug} (solved alone: "
            + ", ".join(f"{name} {value:.0f}" for name, value in solved.items())
            + f") | {len(queries)} | {_counts(learned)} | {_counts(embedding)} |"
        )


def _name(decision) -> str:
    return decision.adapter.model_id if decision.adapter is not None else "base"


def _counts(counter: Counter) -> str:
    return ", ".join(f"{name} {count}" for name, count in counter.most_common())


if __name__ == "__main__":
    main()
