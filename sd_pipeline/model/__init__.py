"""One pipeline in one process: loading, samplers, failure classification and the step engine."""
