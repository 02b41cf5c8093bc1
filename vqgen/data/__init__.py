"""Image datasets, transforms and the LMDB code store."""

from vqgen.data.codes import (
    CodeDataset,
    CodeLevel,
    CodeStoreWriter,
    find_store,
    format_inspection,
    inspect_store,
    make_meta,
    read_store_meta,
)
from vqgen.data.datasets import (
    DataConfig,
    ImageDataset,
    ImageTransform,
    build_dataset,
    denormalize,
    to_uint8,
)
from vqgen.data.procedural import ProceduralShapes

__all__ = [
    "CodeDataset",
    "CodeLevel",
    "CodeStoreWriter",
    "DataConfig",
    "ImageDataset",
    "ImageTransform",
    "ProceduralShapes",
    "build_dataset",
    "denormalize",
    "find_store",
    "format_inspection",
    "inspect_store",
    "make_meta",
    "read_store_meta",
    "to_uint8",
]
