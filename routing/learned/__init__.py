"""The learned router's training and storage (routing.router.learned is how it decides)."""
