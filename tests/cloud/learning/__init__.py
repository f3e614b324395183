"""Tests of ``cloud.learning``."""
