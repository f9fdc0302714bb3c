"""Shared fixtures: the real bundled encoder and generator, loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.settings import PACKAGE_DATA, Settings  # noqa: E402

BANKING77 = PACKAGE_DATA / "banking77"


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tandem")


@pytest.fixture(scope="session")
def settings(session_dir) -> Settings:
    return Settings(data_dir=session_dir / "data")


@pytest.fixture(scope="session")
def encoder(settings):
    from pipeline.encoder import SentenceEncoder

    encoder = SentenceEncoder(settings.encoder)
    encoder.warm_up()
    return encoder


@pytest.fixture(scope="session")
def pipeline(settings):
    """The whole chain on the shipped defaults: intent model, bundled help centre, SmolLM2 via llama.cpp."""
    from pipeline.chain import HybridPipeline

    return HybridPipeline.from_settings(settings)


@pytest.fixture(scope="session")
def banking77_test():
    from pipeline.data_io import read_labelled_csv

    return read_labelled_csv(BANKING77 / "test.csv", "text", "category")
