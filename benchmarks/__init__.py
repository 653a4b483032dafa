"""Benchmarks: scripts that write JSON and PNG to benchmarks/results/ and print a table."""
