"""Stage 7, publish: Ollama tags and Hugging Face GGUF repos with a model card."""
