"""Caches for multi-teacher distillation: the data encoded once (latents), then per teacher its
predictions on deterministic noise, so a student trains on many teachers without holding them.
Every teacher sees the same (t, eps) for the same sample, and a cache rebuilds bit for bit; a batch
comes from one resolution bucket. Layout and schema: docs/cache_format.md.

  format: seeds, records, shards, manifests, buckets    build: latents and teacher caches
  verify: every problem of the caches                   read: the training dataset
"""
from jdistill.data.cache.format import (DTYPES, LATENTS, MANIFEST, READER_OPTIONS, TEACHERS, VERSION,
                                        WRITER_OPTIONS, CacheError, ShardReader, bucket_name,
                                        check_buckets, decode_record, derive_seed, draw_t_eps,
                                        encode_record, fingerprint, nearest_bucket, parse_buckets,
                                        read_manifest, sample_id, teacher_dir, write_shard)
from jdistill.data.cache.build import (Encoder, build_latents, build_teacher, flax_encoder,
                                       make_encoder, map_batches, plan_latents, source_resolutions)
from jdistill.data.cache.read import (CachedBucketSource, TrainingCaches, open_training_caches,
                                      training_dataset)
from jdistill.data.cache.verify import verify   # the function; the module stays in sys.modules
