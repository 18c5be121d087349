"""``finlora serve``: many LoRA adapters over one base model behind an OpenAI-compatible HTTP API.

The request's ``model`` names the adapter (vLLM's multi-LoRA convention). Three modules, one job each:
:mod:`~finlora.server.serving.adapters` keeps every adapter's weights in host memory and at most ``--max-loras`` of
them attached to the model (LRU); :mod:`~finlora.server.serving.engine` batches requests for *different* adapters
into one forward pass per decoding step (PEFT's mixed-adapter batches, ``adapter_names=``) and streams tokens;
:mod:`~finlora.server.serving.api` is the FastAPI app (validation, errors, SSE streaming, the admin endpoints).
"""
