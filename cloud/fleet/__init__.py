"""Fleet operations: rollouts and their wave gates, desired-state publishing, commands, device config."""
