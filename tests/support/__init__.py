"""Test helpers shared by the suites: real brokers, processes and fixtures, no mocks."""
