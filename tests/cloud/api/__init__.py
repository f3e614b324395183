"""Tests of ``cloud.api``."""
