"""Data: sources → tokenizer → FIM → packing → grain pipeline (docs/architecture.md §7). See each module's docstring."""
from dsv3_jax.data.fim import encode_document, fim_rng, fim_split, format_fim, maybe_fim
from dsv3_jax.data.packing import FIELDS, PackIterDataset, build_row, pack_documents, stack_rows
from dsv3_jax.data.pipeline import (DataConfig, ShardedBatches, check_token_ids, document_ids, make_dataset,
                                    num_shards, process_shards, shard_ids, split_document_ids)
from dsv3_jax.data.sources import (JsonlSource, TextFileSource, iter_documents, list_files, open_source,
                                   stdlib_files, stdlib_source)
from dsv3_jax.data.tokenizer import (DEEPSEEK_SPECIAL_TOKENS, SpecialTokens, Tokenizer, load_tokenizer,
                                     train_tokenizer)

__all__ = [
    "DataConfig", "make_dataset", "ShardedBatches", "num_shards", "process_shards", "check_token_ids", "document_ids",
    "shard_ids", "split_document_ids",
    "Tokenizer", "SpecialTokens", "DEEPSEEK_SPECIAL_TOKENS", "train_tokenizer", "load_tokenizer",
    "encode_document", "fim_rng", "fim_split", "maybe_fim", "format_fim",
    "pack_documents", "build_row", "stack_rows", "PackIterDataset", "FIELDS",
    "TextFileSource", "JsonlSource", "open_source", "stdlib_source", "stdlib_files", "list_files",
    "iter_documents",
]
