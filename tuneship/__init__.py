"""tuneship: chat data + open LLM -> LoRA fine-tune -> merged GPTQ W4A16 bundle -> vLLM endpoint.

This package is the shared core (formats, configs, manifests, CLI). It imports neither torch nor
vLLM; the stages (tuneship.train, tuneship.export, tuneship.serve) import their heavy libraries
inside the functions that need them.
"""

__version__ = "0.1.0"
