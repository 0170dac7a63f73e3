"""The portal's playground: a page where a signed-in person asks the live mixture a question
and watches the answer stream in, with who answered and why.

The browser never talks to the inference server and never sees an API key: the portal
relays the request with a short-lived key of the person's own (``keys``), built from the
form's validated fields only (``forms``), to the one endpoint it may reach (``upstream``).
"""
