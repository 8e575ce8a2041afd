"""Data at Megatron scale: `megallama data prepare` and the datasets `sft` reads (docs: docs/data.md).

- records.py: one stream of (where, record) from JSON/JSONL, Parquet, Arrow, a folder or a Hub dataset id;
- samples.py: a record -> (token ids, loss mask), the same rules as `sft` (alpaca, messages, text, pretokenized);
- indexed.py: PREFIX.bin/.idx (megatron-core's IndexedDataset), PREFIX_mask.bin/.idx and PREFIX.json;
- encode.py: the tokenizing workers: a chunk of records -> token, mask and length arrays;
- prepare.py: streaming, parallel tokenization into an indexed dataset, with a summary;
- sources.py: what `data.train` names for `sft` (files, Hub ids, prefixes, blends) -> rows.
"""
