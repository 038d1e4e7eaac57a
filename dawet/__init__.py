"""Dawet: shared settings and process launching for the api, tasks and model_store packages."""
