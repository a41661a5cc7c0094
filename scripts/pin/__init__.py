"""Pin the container images of a stack file by digest, or verify the pins (scripts/pin)."""
