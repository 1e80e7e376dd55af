"""Where the engine runs: the supervised local worker process or Ray Serve replicas.

Both implement ``sd_pipeline.contract.backend.Backend`` and share the failure rules
(``retry``) and the loop that feeds the engine (``engine_loop``).
"""
