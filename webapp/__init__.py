"""The web layer: settings, the request service, the Gradio page and the HTTP server."""
