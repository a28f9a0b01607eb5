"""Outbound HTTP: the SSRF guard (`guard`) and the one client every fetch and webhook goes through (`client`)."""
