"""Cloud benchmarks (``edgefleet bench compress|rollout``): each prints one JSON object."""
