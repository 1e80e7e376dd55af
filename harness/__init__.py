"""Launch helpers shared by the tests and the benchmarks: the app, a loopback S3 server, HAProxy, reference images.

Nothing here is part of the service (the Docker image leaves it out); bench/ and tests/ both import it, and neither
imports the other's modules.
"""
