"""pdcluster: prefill/decode disaggregated LLM serving."""
