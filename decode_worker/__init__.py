"""pdcluster decode_worker role."""
