"""Text → tokens → packed, shuffled, resumable batches."""

from llmjax.data.hf_tokenizer import HFTokenizer, open_tokenizer
from llmjax.data.packing import Batch, BatchIterator, PackedRows, eval_batches
from llmjax.data.pipeline import Data, DataConfig, build_data
from llmjax.data.preference import PreferenceDataConfig, build_preference_data
from llmjax.data.prompts import PromptData, PromptDataConfig, build_prompt_data
from llmjax.data.sft import SFTData, SFTDataConfig, build_sft_data
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
    "HFTokenizer",
    "PackedRows",
    "PreferenceDataConfig",
    "PromptData",
    "PromptDataConfig",
    "SFTData",
    "SFTDataConfig",
    "TokenStream",
    "Tokenizer",
    "TokenizerConfig",
    "build_data",
    "build_preference_data",
    "build_prompt_data",
    "build_sft_data",
    "eval_batches",
    "open_tokenizer",
    "read_documents",
    "resolve_paths",
    "stdlib_files",
    "tokenize_documents",
]
