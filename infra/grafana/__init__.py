"""Grafana: the Sluice dashboard (as code) and its provisioning."""
