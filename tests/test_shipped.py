"""Shipped files: a zip archive cut into parts is joined and unpacked once."""

from __future__ import annotations

import io
import zipfile

import pytest

from spo_ray.judge.reference import model_path
from spo_ray.shipped import unpack_split_zip


def _split_zip(tmp_path, files: dict[str, bytes], parts: int) -> list:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    blob = buf.getvalue()
    size = -(-len(blob) // parts)
    paths = []
    for n in range(parts):
        path = tmp_path / f"model.zip.{n + 1:03d}"
        path.write_bytes(blob[n * size : (n + 1) * size])
        paths.append(path)
    return paths


def test_split_zip_is_joined_unpacked_once_and_checked(tmp_path):
    files = {"model/config.json": b'{"a": 1}', "model/weights.bin": bytes(range(256)) * 500}
    parts = _split_zip(tmp_path, files, parts=3)
    dest = unpack_split_zip(parts, tmp_path / "cache" / "model-1")
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} == set(files)
    assert (dest / "model" / "weights.bin").read_bytes() == files["model/weights.bin"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["model-1"]  # no temporaries left
    # Once unpacked, the parts are not read again.
    for p in parts:
        p.unlink()
    assert unpack_split_zip(parts, dest) == dest
    # A part missing, or parts in the wrong order, fail without leaving a folder behind.
    parts = _split_zip(tmp_path, files, parts=3)
    with pytest.raises(FileNotFoundError, match="missing"):
        unpack_split_zip(parts[:2] + [tmp_path / "nope"], tmp_path / "cache" / "model-2")
    with pytest.raises((zipfile.BadZipFile, OSError)):  # no end-of-archive record where zipfile looks
        unpack_split_zip(parts[::-1], tmp_path / "cache" / "model-2")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["model-1"]


def test_model_path_names_the_shipped_models():
    assert model_path("/some/folder") == "/some/folder"
    with pytest.raises(ValueError, match="all-mpnet-base-v2"):
        model_path("shipped:bge-small")
