"""gpuctl: share rented GPUs running Ollama — wake on demand, route, queue fairly, pause when idle."""

__version__ = "0.1.0"
