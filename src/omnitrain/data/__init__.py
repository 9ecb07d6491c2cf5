"""Multimodal data: LLaMA-Factory / LLaVA json in, the model family's inputs out.

Public API:
    load_processor(model_cfg)                 the family's HF processor
    build_loader(data_cfg, family, processor, *, seed, micro_batch_size,
                 global_batch_size, dp_rank=0, dp_size=1)  endless micro-batches
    count_label_tokens(micro_batch)           label tokens after the causal shift
    DataError                                 one-line error naming dataset, sample, file
"""

from omnitrain.data.collate import collate, count_label_tokens
from omnitrain.data.config import DataConfig, quote_dataset_lists
from omnitrain.data.errors import DataError
from omnitrain.data.loader import OmniLoader, build_dataset, build_loader
from omnitrain.data.processor import load_processor, token_ids

__all__ = [
    "DataConfig",
    "DataError",
    "OmniLoader",
    "build_dataset",
    "build_loader",
    "collate",
    "count_label_tokens",
    "load_processor",
    "quote_dataset_lists",
    "token_ids",
]
