"""The Ray Serve application: HTTP API, dynamic batching, metrics and the painting page."""
