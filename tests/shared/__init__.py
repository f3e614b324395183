"""Tests of ``shared``."""
