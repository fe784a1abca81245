"""The engine: Llama-family model, paged KV cache, model runner, sampler, tokenizer, offline LLM.

Checkpoints load through `loader.py`; `model_files.py` reads what a model is from its files
without torch (format, config, tokenizer) and its `LAYOUTS` table lists the non-Llama layouts
(`llada_layout.py`, `sdar_layout.py`, `moe_layout.py`).

Heavy imports (torch, gguf, tokenizers) stay inside the submodules; import what you use,
e.g. `from cluster.engine.model_runner import ModelRunner`.
"""
