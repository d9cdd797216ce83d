"""Model catalog, residency (memory budget, LRU, idle TTL) and local weights."""
