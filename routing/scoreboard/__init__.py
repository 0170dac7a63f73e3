"""The scoreboard: what the composed system of each mixture version scores on the union of
the built-in suites' hidden and paraphrase splits (figures: the pure arithmetic; services:
gathering outcomes and routing decisions, storing, queueing)."""
