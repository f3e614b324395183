"""Cloud benchmarks (``edgefleet bench compress|rollout|console``): each prints one JSON object."""
