"""Retrieval QA over your documents with the tuned embedder and LLM."""
