"""Fine-tune an embedding model on your own documents and measure it against the base."""
