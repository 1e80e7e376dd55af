"""Where the engine runs: the supervised local worker process or Ray Serve replicas.

Both implement ``sd_pipeline.contract.backend.Backend``, carry the one message set
(``contract.messages``), share the loop that feeds the engine (``engine_loop``) and the one
definition of a stall (``stall``).
"""
