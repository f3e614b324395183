"""Tests of the web console (cloud/console), in a real browser where it matters."""
