"""Where rows come from: local parquet file(s) or folder, a saved HF dataset, an in-memory Dataset, or a hub id.

Everything is opened as a `datasets.Dataset`: its Arrow files are memory-mapped, so a dataset far larger than
RAM (Pick-a-Pic v2 is hundreds of GB) is read row by row without loading it. Rows are read as Arrow, never through
`datasets`' own decoding, so image bytes stay bytes until we decode them (and a bad one is reported by row).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from diffalign.data.errors import DataError


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return str(path.resolve()) if path.exists() else str(source)
    files = getattr(source, "cache_files", None)
    if files:  # a datasets.Dataset backed by Arrow files: name it by its first file
        return files[0]["filename"]
    return f"<{type(source).__name__}>"


def open_source(source: Any, *, split: str = "train", cache_dir: str | None = None):
    """Open `source` as a `datasets.Dataset`.

    - a `datasets.Dataset` (or `DatasetDict`, then `split` is taken) is used as is;
    - a `.parquet` file, or a folder of `*.parquet` files (searched recursively) whose `split` is chosen by
      datasets' file-name rules (`parquet_splits`);
    - a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (read with `load_from_disk`);
    - anything else that is not a local path is taken as a hub id and read with `datasets.load_dataset` (network).
    """
    import datasets

    if isinstance(source, datasets.DatasetDict):
        return _pick_split(source, split, _describe(source))
    if isinstance(source, datasets.Dataset):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"data source must be a path, a hub id or a datasets.Dataset; got {type(source).__name__}. "
            "Fix: pass a parquet file/folder, a save_to_disk folder, or a hub id such as 'yuvalkirstain/pickapic_v2'."
        )
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".parquet":
            raise DataError(
                f"{path} is a file but not a .parquet file.",
                fix="pass a .parquet file, a folder of .parquet files, or a folder written by save_to_disk.",
            )
        _refuse_empty([str(path)], str(path))
        return datasets.Dataset.from_parquet([str(path)], cache_dir=cache_dir)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                return _pick_split(loaded, split, str(path))
            return loaded
        if next(path.rglob("*.parquet"), None) is None:
            raise FileNotFoundError(
                f"{path} holds no *.parquet files and is not a save_to_disk folder. "
                "Fix: point at the folder that `diffalign synth` wrote, a Pick-a-Pic parquet folder, or a save_to_disk folder."
            )
        splits = parquet_splits(path)
        if split not in splits:
            raise DataError(f"{path} has no {split!r} split (its file names give {sorted(splits)}).",
                            fix="pass dataset_split= one of those splits.")
        _refuse_empty(splits[split], str(path))
        return datasets.Dataset.from_parquet(splits[split], cache_dir=cache_dir)
    text = str(source)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(".parquet")
    if not looks_like_hub_id:
        raise FileNotFoundError(
            f"data source {text!r} does not exist. Fix: check the path (parquet file or folder, or a save_to_disk folder), "
            "or pass a hub id of the form 'owner/name'."
        )
    return datasets.load_dataset(text, split=split, cache_dir=cache_dir)


def parquet_splits(folder: Path) -> dict[str, list[str]]:
    """{split: sorted .parquet files} of a folder, by `datasets`' file-name rules (as `load_dataset("parquet",
    data_dir=folder)`): `train-*`, `data/test-*`, `validation/...` name their split; files that name none are
    all "train". So a local Pick-a-Pic snapshot does not leak its test rows into training."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    found = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    splits = {str(name): sorted(f for f in files if f.endswith(".parquet")) for name, files in found.items()}
    return {name: files for name, files in splits.items() if files}


def _refuse_empty(files: list[str], where: str) -> None:
    import pyarrow.parquet as pq

    if sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 0:
        raise DataError(f"the data source {where} has no rows.", fix="point at a non-empty dataset.")


def _pick_split(dataset_dict, split: str, where: str):
    if split not in dataset_dict:
        raise DataError(
            f"{where} has no split {split!r}; it has {sorted(dataset_dict)}.", fix=f"pass split= one of {sorted(dataset_dict)}."
        )
    return dataset_dict[split]


def arrow_columns(dataset) -> dict[str, pa.DataType]:
    """Column name -> Arrow type, as stored (before any `datasets` feature decoding)."""
    schema = dataset.data.schema if hasattr(dataset, "data") else dataset.schema
    return {field.name: field.type for field in schema}


def arrow_column(dataset, name: str) -> pa.ChunkedArray:
    """One column as Arrow (memory-mapped, zero-copy when the dataset has no indices mapping)."""
    column = dataset.with_format("arrow")[name]
    if isinstance(column, pa.Array):
        column = pa.chunked_array([column])
    return column


def arrow_row(view, index: int, columns: list[str]) -> dict[str, Any]:
    """Row `index` of `view` (a Dataset already in "arrow" format) as Python values (image bytes stay bytes)."""
    table = view[int(index)]
    return {name: table.column(name)[0].as_py() for name in columns}


# Type predicates. Images may be raw bytes (Pick-a-Pic, Syn-Pic) or datasets' Image struct {bytes, path}.
def is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def is_image(t: pa.DataType) -> bool:
    if is_binary(t):
        return True
    if pa.types.is_struct(t):
        names = {t.field(i).name for i in range(t.num_fields)}
        return "bytes" in names
    return False


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_list_view(t)


def is_number(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t)


def list_of(t: pa.DataType, predicate) -> bool:
    return is_list(t) and predicate(t.value_type)


def blank_text_rows(column) -> np.ndarray:
    """Rows whose string value is empty or only whitespace (nulls are reported separately)."""
    import pyarrow.compute as pc

    trimmed = pc.utf8_trim_whitespace(column.cast(pa.large_string()))
    return np.flatnonzero(pc.fill_null(pc.equal(trimmed, ""), False).to_numpy(zero_copy_only=False))
