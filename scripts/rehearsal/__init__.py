"""The offline rehearsal: a stack's data plane run in network namespaces on one machine."""
