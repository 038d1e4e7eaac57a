"""Offline builder for the tiny Dawet demo chat model, its LoRA adapter and a benchmark model."""
