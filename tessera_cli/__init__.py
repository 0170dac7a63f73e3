"""``tessera``: the command line for contributors.

It speaks only to Tessera's two public HTTP APIs, the REST API (``/api/v1/…``) and the
OpenAI-compatible inference API (``/v1/…``), so it runs on a contributor's machine without the
platform's server code or its database. ``tessera train`` also runs the training kit
(evaluation.training, imported only by that command), which needs neither.
"""
