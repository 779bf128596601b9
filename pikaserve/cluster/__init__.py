"""Scale-out on Ray Serve (`pikaserve serve --replicas N`, docs/cluster.md): whole engines as
Ray Serve replicas (replica.py) behind pikaserve's own HTTP server, which reaches them through
one deployment handle (client.py); a request router (router.py) picks the replica by the
cached prefixes it is thought to hold (prefix_index.py). Needs `pikaserve[cluster]` (Ray)."""
