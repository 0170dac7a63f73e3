"""Admission by marginal contribution: a version that passed the admission policy joins the
mixture at once only if the mixture does not get worse with it.

The mixture (the active one's public members) is scored on the union of the built-in
suites' hidden and paraphrase splits twice, without the candidate and with it, from the
stored per-example outcomes (the candidate's run has just stored its own) and the
embedding router's decisions in each catalog: seconds, no generation. A candidate that
lowers the routed score by more than TESSERA_ADMISSION_MAX_MIXTURE_DROP is held for a
maintainer's review with that figure; one that claims prompts it answers worse than their
current adapter (a "squatter") is what this catches.
"""

from __future__ import annotations

from django.conf import settings

from contributions.models import AdapterVersion
from evaluation.policy import AdmissionCheck, Rule
from evaluation.services.outcomes import outcomes_table, union_splits
from routing import selectors
from routing.scoreboard.services import members_of, public_catalog, router_decisions

RULE = "mixture_contribution"


def mixture_contribution_rule(version: AdapterVersion) -> Rule | None:
    """The rule's verdict on ``version`` (see the module docstring). Caller holds the
    transaction that records the version's run."""
    margin = float(settings.TESSERA_ADMISSION_MAX_MIXTURE_DROP)
    if version.adapter.visibility == version.adapter.Visibility.PRIVATE:
        return Rule(
            RULE,
            True,
            "A private adapter answers its owner's requests only, so it cannot change the "
            "public mixture's score.",
            {"measured": False},
        )
    splits = union_splits()
    if not splits:
        return None
    mixture = selectors.mixture_active()
    members = [v for v in (members_of(mixture) if mixture else []) if v.pk != version.pk]
    example_ids = [pk for split in splits for pk in split.example_ids]
    table = outcomes_table(
        base_model_id=version.base_model_id,
        version_ids=[v.pk for v in [*members, version]],
        example_ids=example_ids,
    )
    incomplete = sum(1 for scores in table.values() if len(scores) < len(example_ids))
    if incomplete:
        return Rule(
            RULE,
            True,
            f"Not measured: {incomplete} of the {len(table)} models have no outcome on some "
            "example of the union yet (the scoreboard job measures them).",
            {"measured": False},
        )
    without = _routed(mixture, members, splits, table, example_ids)
    with_it = _routed(mixture, [*members, version], splits, table, example_ids)
    delta = with_it - without
    passed = delta >= -margin
    detail = (
        f"With this adapter the mixture scores {with_it:.3f} on the {len(example_ids)} "
        f"examples of the hidden and paraphrase union, against {without:.3f} without it "
        f"({delta:+.3f})."
    )
    if not passed:
        detail += (
            f" That is a fall of more than {margin:g}, so a maintainer reviews it before it "
            "is admitted."
        )
    values = {
        "measured": True,
        "with": with_it,
        "without": without,
        "delta": delta,
        "n": len(example_ids),
        "margin": margin,
        "held_for_review": not passed,
    }
    return Rule(RULE, passed, detail, values)


def _routed(mixture, versions, splits, table, example_ids) -> float:
    decisions = router_decisions(public_catalog(mixture, versions), splits)["embedding"]
    picks = [d.adapter.version_id if d.adapter is not None else None for d in decisions]
    scores = [table[pick][pk] for pick, pk in zip(picks, example_ids, strict=True)]
    return sum(scores) / len(scores)


def _words() -> str:
    margin = float(settings.TESSERA_ADMISSION_MAX_MIXTURE_DROP)
    return (
        "Before an adapter that passes is admitted, the live mixture is scored with it and "
        "without it on every benchmark's hidden and paraphrase examples, with the router "
        "choosing as it would for real requests. If adding the adapter lowers the mixture's "
        f"score by more than {margin:g}, a maintainer reviews it first and sees that figure."
    )


MIXTURE_CONTRIBUTION = AdmissionCheck(rule=mixture_contribution_rule, words=_words)
