"""Search an embedded collection: `embed` (a collection → vectors, lexical weights and image bytes on
disk), `index` (dense FAISS and sparse inverted indexes), `query` (texts and images → the top-k items of
an index), `server` (FastAPI app and the search page)."""
