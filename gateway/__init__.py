"""vllm-gateway: an on-demand, multi-model OpenAI-compatible gateway for vLLM."""
from gateway.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]
