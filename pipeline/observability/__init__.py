"""Metrics, health endpoints, and the process and GPU collectors every service registers."""
