"""The engine: Llama-family model, paged KV cache, model runner, sampler, tokenizer, offline LLM.

Checkpoints load through `loader.py`, whose `LAYOUTS` table lists the non-Llama layouts it
reads (`llada_layout.py`, `sdar_layout.py`).

Heavy imports (torch, gguf, tokenizers) stay inside the submodules; import what you use,
e.g. `from cluster.engine.model_runner import ModelRunner`.
"""
