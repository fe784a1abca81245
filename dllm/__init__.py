"""pdcluster dllm role."""
