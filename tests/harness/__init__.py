"""Shared test harnesses: real servers the tests start (Redis, an LLM provider, Prometheus,
proxy processes) and the fake clock."""
