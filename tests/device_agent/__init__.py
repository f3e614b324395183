"""Tests of ``device_agent``."""
