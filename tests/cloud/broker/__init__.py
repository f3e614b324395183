"""Tests of ``cloud.broker``."""
