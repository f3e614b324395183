"""Attacks that must fail (design.md, "Targets"): each test shows the attack failing and the
legitimate path working."""
