"""What an evaluation worker runs beside the Django process: the sandbox that starts the
child, the child itself (``python -m evaluation.worker.child``), and the Django-free pieces
the child imports (specs, scoring, sketches), plus routing signatures, which the worker
computes after the child answers.

Importing this package imports nothing: the child must stay light and never load settings.
"""
