"""The live mixture, the router, the inference engine and the public inference API."""
