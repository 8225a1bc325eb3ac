"""Deployment: the local stack of real services, cluster and container recipes. No business logic."""
