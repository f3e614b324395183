"""Tests of ``cloud.fleet``."""
