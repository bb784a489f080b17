"""Data sources: where (image, captions) pairs come from, one module per kind. `registry.py` knows
them all (kind → detect, scan, count, open for training); a new kind is one module and one line there.
Every kind yields `lipkit.data.records.Record` and `Skip`."""
