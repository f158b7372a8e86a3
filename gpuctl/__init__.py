"""gpuctl: shared Ollama GPUs that wake on demand, queue fairly and pause when idle."""

__version__ = "0.1.0"
