"""Fixtures of the tracking tests: fresh SQLite MLflow stores, copied from one migrated template.

Creating an MLflow SQLite store runs its schema migrations (seconds); copying a migrated one is instant.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow SQLite store (read-only: copy it)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "template.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables once
    return path


@pytest.fixture
def new_store(mlflow_template_db: Path):
    """`new_store(path) -> "sqlite:///<path>"`: a fresh MLflow store at `path` (parents created)."""

    def make(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(mlflow_template_db, path)
        return f"sqlite:///{path}"

    return make
