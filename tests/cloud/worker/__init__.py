"""Tests of ``cloud.worker``."""
