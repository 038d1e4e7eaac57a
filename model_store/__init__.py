"""What a served model is (registry, tokenizer, chat template) and how it is loaded.

Importing this package loads no torch: `model_store.loader` does, and only workers import it.
"""
