"""Tests of gpu-node/: the entrypoint, the Caddy proxy, the compose file."""
