"""The engine in Ray Serve replicas, reached through a deployment handle."""
