"""Datasets, loaders and augmentation (timm transforms and mixing; batched on-device ops)."""
from .build import DataInfo, Loaders, build_loaders, load_arrays
from .config import AugmentConfig, DataConfig
from .sources import ImageArrays, decode_archive, decode_imagefolder, digits
from .tensor_loader import TensorLoader

__all__ = ["AugmentConfig", "DataConfig", "DataInfo", "Loaders", "build_loaders", "load_arrays",
           "ImageArrays", "decode_archive", "decode_imagefolder", "digits", "TensorLoader"]
