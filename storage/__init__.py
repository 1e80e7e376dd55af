"""Image storage: S3 or a local folder, presigned or signed links, per-owner history."""
