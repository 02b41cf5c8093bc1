"""Image datasets, transforms and the LMDB code store."""

from vqgen.data.code_dataset import CodeDataset, find_store, store_checksum
from vqgen.data.code_format import CodeLevel, StoreMeta, make_meta, parse_meta
from vqgen.data.code_inspection import format_inspection, inspect_store
from vqgen.data.code_readers import read_store_meta
from vqgen.data.code_writer import CodeStoreWriter
from vqgen.data.datasets import (
    DataConfig,
    ImageDataset,
    ImageTransform,
    build_dataset,
    denormalize,
    to_uint8,
)
from vqgen.data.procedural import ProceduralConfig, ProceduralShapes

__all__ = [
    "CodeDataset",
    "CodeLevel",
    "CodeStoreWriter",
    "DataConfig",
    "ImageDataset",
    "ImageTransform",
    "ProceduralConfig",
    "ProceduralShapes",
    "StoreMeta",
    "build_dataset",
    "denormalize",
    "find_store",
    "format_inspection",
    "inspect_store",
    "make_meta",
    "parse_meta",
    "read_store_meta",
    "store_checksum",
    "to_uint8",
]
