"""tunerag's shared core: what every command uses (errors, flags, cache folder, model resolution,
document reading, the shipped sample data). The command packages `embeddings`, `llm_finetune` and
`rag` build on it; `tunerag.pipeline` and the `tunerag` console script (`tunerag.cli`) sit on top."""

__version__ = "0.2.0"
