"""What a model is and how it is prompted: the recipe schema, DeepSeek's prompt formats and
llama.cpp's quantization types. Every stage reads these; they import no stage.
"""
