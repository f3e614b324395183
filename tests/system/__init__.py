"""End-to-end tests of the whole system: the demo, its fault scenarios, packaging, compose."""
