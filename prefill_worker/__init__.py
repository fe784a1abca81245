"""pdcluster prefill_worker role."""
