"""Benchmarks: measured side by side in one run, written as JSON with the device, versions and command."""
