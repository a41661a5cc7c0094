"""Offline, pinned Helm tooling: install helm, fetch charts by pin, render them and validate custom resources against their CRDs."""
