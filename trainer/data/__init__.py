"""Datasets: scanning, captions, buckets and caches."""
