"""The contract between the web layer and the backends: no torch, no diffusers, no Ray.

Requests and their limits (``check_inputs``), jobs and results, the facts a pipeline reports,
the backend protocol and its errors, and the plain settings and plans that configure a
backend. Anything may import this package; it imports nothing heavy (a test enforces it).
"""
