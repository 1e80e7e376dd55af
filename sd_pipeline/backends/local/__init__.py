"""The engine in a worker process of its own, replaced by a supervisor when it dies or stalls."""
