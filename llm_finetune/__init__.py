"""QLoRA fine-tuning of a causal LLM and a verified full-precision merge."""
