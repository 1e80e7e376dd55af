"""Prometheus metrics, the side-port HTTP server and health checks."""
