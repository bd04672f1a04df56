"""Kubernetes: typed CustomResources, the API client, watches, and the CR-backed controller engine.

The only package that imports the `kubernetes` client; everything it hands out is a frozen value."""
