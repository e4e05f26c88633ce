"""Weight conversion between Hugging Face checkpoints and qwq-jax (Orbax) checkpoints."""
