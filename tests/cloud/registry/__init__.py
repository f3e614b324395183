"""Tests of ``cloud.registry``."""
