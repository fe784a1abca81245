"""Capacity planning: `pdcluster profile` measures a cost model on a launched cluster,
`pdcluster plan` simulates static layouts under it and names the best one per SLO."""
