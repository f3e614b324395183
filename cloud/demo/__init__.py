"""``edgefleet demo``: the whole topology on one machine (runner, scenarios, runtime, monitor, supervisor)."""
