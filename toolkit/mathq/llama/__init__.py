"""llama.cpp in process: loading models and contexts, llama.cpp's log, the continuous-batching
engine and ggml tensor views. Shared by the stages that run a model.
"""
