"""The serving process: the engine's runtime, its scheduler thread, the mixture sync."""
