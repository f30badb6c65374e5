"""Fixtures for the finetune CLI tests: a tiny random BERT folder and toy SST-2-shaped data."""
from __future__ import annotations

import pytest

from tests.cli._tiny import make_sst2_like, make_tiny_bert


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return make_sst2_like(tmp_path_factory.mktemp("tiny_sst2"))
