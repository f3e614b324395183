"""Tests of ``edge_node``."""
