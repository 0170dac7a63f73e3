"""The OpenAI-compatible inference API served by the serving process (tessera.serving)."""
