"""Kubernetes manifests rendered from the scaling policies (``python -m infra.k8s.render``)."""
