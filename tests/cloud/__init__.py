"""Tests of ``cloud``."""
