"""`prag serve`: the HTTP service (app.py), batched answering (batcher.py), live ingestion (ingest.py)."""
