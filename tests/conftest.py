"""Fixtures shared by the test files: the tiny offline extractor, the synthetic tokenizer and the tiny model config.

Each builds in well under a second, offline: the extractor runs the randomly initialised `test_efficientnet`
backbone, the tokenizer is the synthetic set's own word list, and the config is `testing_utils.tiny_config_kwargs`.
The factories take keyword overrides, so a test states only what it changes.
"""

import pytest

from imagebert_hf.data.synthetic import make_synthetic_tokenizer
from imagebert_hf.models.imagebert.configuration_imagebert import ImageBERTConfig
from imagebert_hf.models.imagebert.image_processing_imagebert import ImageBERTRoIExtractor

from .testing_utils import tiny_config_kwargs


# A randomly initialised test backbone at 64 x 64 with the whole image and a 2 x 2 grid as regions: the regions mean
# nothing, which is all the tests that use it need.
TINY_EXTRACTOR_KWARGS = {
    "backbone_name": "test_efficientnet",
    "backbone_weights": None,
    "size": {"height": 64, "width": 64},
    "grid_sizes": [1, 2],
}


@pytest.fixture(scope="session")
def make_tiny_extractor():
    """`make_tiny_extractor(**overrides)`: a new `ImageBERTRoIExtractor(**TINY_EXTRACTOR_KWARGS, **overrides)`."""

    def make(**overrides) -> ImageBERTRoIExtractor:
        return ImageBERTRoIExtractor(**{**TINY_EXTRACTOR_KWARGS, **overrides})

    return make


@pytest.fixture(scope="session")
def tokenizer():
    """The synthetic set's word-level BERT tokenizer (`make_synthetic_tokenizer`): every caption, no download."""
    return make_synthetic_tokenizer()


@pytest.fixture(scope="session")
def make_tiny_config():
    """`make_tiny_config(**overrides)`: a new `ImageBERTConfig(**tiny_config_kwargs(**overrides))`."""

    def make(**overrides) -> ImageBERTConfig:
        return ImageBERTConfig(**tiny_config_kwargs(**overrides))

    return make


@pytest.fixture
def one_thread():
    """Runs the test on one torch thread: figures recorded that way (learning floors, golden losses) depend on the
    order of float reductions, which the thread count changes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache_copy(cache_folder, tmp_path):
    """A copy of the module's `cache_folder` region cache, for a test to damage."""
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(cache_folder, copy)
    return copy


@pytest.fixture(scope="module")
def spark():
    """A one-core local Spark session for the module's tests (skipped without pyspark), stopped after them."""
    pytest.importorskip("pyspark")
    from imagebert_hf.curation.spark import local_spark_session

    session = local_spark_session("local[1]", shuffle_partitions=1)
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
