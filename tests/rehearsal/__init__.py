"""End-to-end tests of the offline rehearsal (root, network namespaces, real daemons)."""
