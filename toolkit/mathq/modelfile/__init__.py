"""Stage 4, modelfile: Ollama Modelfiles with DeepSeek's template, and a validator that reads them
by Ollama's rules.
"""
