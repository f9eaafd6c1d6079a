"""Text → tokens → packed, shuffled, resumable batches."""

from llmjax.data.packing import Batch, BatchIterator, PackedRows, eval_batches
from llmjax.data.pipeline import Data, DataConfig, build_data
from llmjax.data.sources import DataError, Document, read_documents, resolve_paths, stdlib_files
from llmjax.data.tokenizer import Tokenizer, TokenizerConfig
from llmjax.data.tokens import TokenStream, tokenize_documents

__all__ = [
    "Batch",
    "BatchIterator",
    "Data",
    "DataConfig",
    "DataError",
    "Document",
    "PackedRows",
    "TokenStream",
    "Tokenizer",
    "TokenizerConfig",
    "build_data",
    "eval_batches",
    "read_documents",
    "resolve_paths",
    "stdlib_files",
    "tokenize_documents",
]
