"""Training data: sources, image decoding, buckets, crops, time ids."""
