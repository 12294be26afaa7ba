"""Train and evaluate a semantic segmenter on maskmill runs (transformers' SegFormer)."""
