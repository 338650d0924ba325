"""Latent and text-embedding caches: sharded safetensors, fingerprinted, written atomically.

Modules, by responsibility:

* ``shards``   - shard files: atomic write, checksum, memory-mapped reader
* ``manifest`` - the index (manifest), fingerprints, model identities, the build lock
* ``builder``  - the incremental, resumable build shared by both caches
* ``latents``  - VAE latents (``nlora cache latents``)
* ``text``     - CLIP embeddings (``nlora cache text --to-disk``)
* ``dataset``  - the training data set over the caches (or over the images)
* ``loader``   - bucket batch sampler and prefetching loader
* ``info``     - ``nlora cache info``
"""

from naruto_lora.cache.dataset import TrainDataset, build_train_dataset
from naruto_lora.cache.latents import ItemMeta, LatentCache, ensure_latent_cache, latent_cache_dir
from naruto_lora.cache.loader import BucketBatchSampler, collate, make_batch_sampler, make_loader
from naruto_lora.cache.text import TextCache, ensure_text_cache, text_cache_dir

__all__ = [
    "BucketBatchSampler",
    "ItemMeta",
    "LatentCache",
    "TextCache",
    "TrainDataset",
    "build_train_dataset",
    "collate",
    "ensure_latent_cache",
    "ensure_text_cache",
    "latent_cache_dir",
    "make_batch_sampler",
    "make_loader",
    "text_cache_dir",
]
