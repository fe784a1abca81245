"""Starting clusters: `launcher.py` (local processes, supervised), `ray_backend.py` (Ray
actors), `k8s.py` (Kubernetes manifests), `child_process.py` (one supervised child), and
`cli.py` (the `pdcluster` console script)."""
