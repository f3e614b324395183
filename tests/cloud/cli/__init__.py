"""Tests of ``cloud.cli``."""
