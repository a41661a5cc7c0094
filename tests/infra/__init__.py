"""The testinfra verification suite: checks by host role, run against an inventory."""
