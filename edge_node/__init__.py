"""edgefleet edge node: batched LiteRT inference, local decisions, uplink and model hot-swap."""
