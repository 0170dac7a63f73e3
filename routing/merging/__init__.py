"""The merged adapter: a mixture version's public members merged into one LoRA with PEFT
(``merge``: the arithmetic, no database; ``services``: the job, its row and its files)."""
