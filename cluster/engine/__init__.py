"""The engine: Llama-family model, paged KV cache, model runner, sampler, tokenizer, offline LLM.

Heavy imports (torch, gguf, tokenizers) stay inside the submodules; import what you use,
e.g. `from cluster.engine.model_runner import ModelRunner`.
"""
