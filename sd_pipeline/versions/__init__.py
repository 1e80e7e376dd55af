"""Model versions in S3: publish, promote, list, fetch into a verified cache, and roll out.

Layout under ``s3://BUCKET/PREFIX``: ``versions/NAME/`` holds a diffusers pipeline folder and
its ``manifest.json`` (written last: a version without one is incomplete), and ``current``
names the version in service. Nothing here imports torch: the web process uses it too.
"""
