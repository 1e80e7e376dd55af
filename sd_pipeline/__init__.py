"""Generation core: loading, request validation, batched generation, PNG encoding."""
