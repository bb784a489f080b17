"""Search an embedded collection: `embed` (collections and queries → vectors), `index` (dense FAISS
and sparse inverted indexes), `server` (FastAPI app and the search page)."""
