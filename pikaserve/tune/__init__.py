"""`pikaserve tune`: the report's requirements -> workload -> config -> benchmark -> tune loop
as one command (docs/tune.md)."""
