"""`load`: benchmark files on disk -> `Sample` objects.

Formats (detected from the path when ``format`` is None):

* ``"tsv"``: a VLMEvalKit TSV (``index``, base64 ``image`` or a list of them, ``question``,
  option columns ``A``.., ``answer``, ``category`` and the benchmark's own columns). An
  ``image`` entry of at most 64 characters is the ``index`` of the row holding the image
  (VLMEvalKit stores a figure shared by several questions once).
* ``"hf"``: a Hugging Face ``datasets`` folder written by ``save_to_disk`` (a Dataset or
  a DatasetDict).

Images stay compressed until used: `Sample.images` is a `LazyImages` that decodes on
each access, so a benchmark of thousands of pictures fits in memory.
* ``"parquet"``: one parquet file, or a folder of them (as the benchmarks publish them on
  the Hub: ``data/<split>-00000-of-00001.parquet``), read with ``datasets``.
* ``"jsonl"``: one JSON object per line, image paths relative to the file (``image``: a
  path, or ``images``: a list of paths).

The benchmark (which adapter maps the rows, see `headgain.eval.adapters`) is detected
from the columns unless ``benchmark`` names it.
"""

from __future__ import annotations

import csv
import glob
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from ..core import jsonio
from .adapters import ADAPTERS, detect
from .images import LazyImages, split_image_list
from .sample import Sample

__all__ = ["load", "FORMATS", "DataError", "detect_format"]

FORMATS = ("tsv", "hf", "parquet", "jsonl")
_FORMATS_TEXT = (
    "headgain reads VLMEvalKit TSV (.tsv), Hugging Face datasets folders (save_to_disk), parquet files or "
    "folders of them, and JSONL (.jsonl, image paths relative to the file)"
)
#: Columns that may hold a row's images, in order of preference (MathVista and MathVision
#: keep a path in ``image`` and the decoded picture in ``decoded_image``).
IMAGE_COLUMNS = ("decoded_image", "images", "image", "image_path")


class DataError(ValueError):
    """A benchmark file headgain cannot read; the message names the file, the problem and
    the formats read."""


def detect_format(path: str) -> str:
    """The format of ``path`` (one of `FORMATS`), from its extension or folder contents."""
    if not os.path.exists(path):
        raise DataError(f"benchmark path not found: {path}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(
            os.path.join(path, "dataset_dict.json")
        ):
            return "hf"
        if _parquet_files(path):
            return "parquet"
        raise DataError(
            f"{path}: a folder with neither a saved Hugging Face dataset nor parquet files; {_FORMATS_TEXT}"
        )
    lowered = path.lower()
    for ext, name in ((".tsv", "tsv"), (".parquet", "parquet"), (".jsonl", "jsonl")):
        if lowered.endswith(ext):
            return name
    raise DataError(f"{path}: unknown file type; {_FORMATS_TEXT}")


def load(
    path: str, format: str | None = None, split: str | None = None, benchmark: str | None = None
) -> Iterator[Sample]:
    """The samples of a benchmark file or folder, lazily (images are decoded per sample).

    Args:
        path: a ``.tsv``, ``.jsonl`` or ``.parquet`` file, or a folder (saved dataset or
            parquet files).
        format: one of `FORMATS`; None detects it from ``path``.
        split: which split to read (a DatasetDict's key, a parquet file name prefix, or
            the value of a ``split`` column in TSV/JSONL); None takes the only split and
            raises when there are several.
        benchmark: the adapter to use (a key of `headgain.eval.adapters.ADAPTERS`); None
            detects it from the columns.

    Raises:
        DataError: unreadable path, unknown format or split, or a missing column (named,
            with the formats headgain reads) when called; a row that does not convert
            (an answer that is not an option, a duplicate id, an unreadable image) while
            iterating.
    """
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    if benchmark is not None and benchmark not in ADAPTERS:
        raise DataError(f"unknown benchmark {benchmark!r}; adapters: {', '.join(ADAPTERS)}")
    rows, columns, base_dir = {"tsv": _tsv, "hf": _hf, "parquet": _parquet, "jsonl": _jsonl}[fmt](path, split)
    adapter = ADAPTERS[benchmark or detect(columns, path)]
    missing = adapter.missing(columns)
    if missing:
        raise DataError(
            f"{path}: column(s) {', '.join(repr(m) for m in missing)} missing for the {adapter.name} adapter "
            f"(columns found: {', '.join(columns)}); {_FORMATS_TEXT}"
        )
    return _samples(rows, adapter, base_dir, path)


def _samples(rows, adapter, base_dir, path) -> Iterator[Sample]:
    seen: set[str] = set()
    for index, row in enumerate(rows):
        images = LazyImages(_image_values(row), base_dir, f"{path} row {index}")
        try:
            images.check()
        except ValueError as e:  # the message names the file and row
            raise DataError(str(e)) from None
        try:
            sample = adapter.convert(row, images, index)
        except ValueError as e:
            raise DataError(f"{path}: {e}") from None
        sample.meta.setdefault("benchmark", adapter.name)
        if sample.id in seen:
            raise DataError(f"{path}: sample id {sample.id!r} appears twice (row {index}); ids must be unique")
        seen.add(sample.id)
        yield sample


def _image_values(row: Mapping[str, Any]) -> list:
    for column in IMAGE_COLUMNS:
        value = row.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if isinstance(value, str):
            return split_image_list(value)
        if isinstance(value, (list, tuple)):
            return [v for v in value if v is not None]
        return [value]
    return []


def _filter_split(rows: list[dict], split: str | None, path: str) -> list[dict]:
    if split is None:
        return rows
    if rows and "split" not in rows[0]:
        raise DataError(f"{path}: --split {split!r} given but the file has no 'split' column")
    kept = [r for r in rows if str(r.get("split")) == split]
    if not kept:
        found = sorted({str(r.get("split")) for r in rows})
        raise DataError(f"{path}: no rows of split {split!r}; splits found: {', '.join(found)}")
    return kept


def _tsv(path: str, split: str | None):
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = [dict(r) for r in reader]
        columns = list(reader.fieldnames or [])
    if not rows:
        raise DataError(f"{path}: no rows (an empty TSV); {_FORMATS_TEXT}")
    by_index = {r.get("index"): r.get("image") for r in rows if "index" in r}
    for r in rows:  # a short image entry names the row whose image it shares
        image = r.get("image")
        if image is not None and 0 < len(image) <= 64 and image in by_index and len(by_index[image] or "") > 64:
            r["image"] = by_index[image]
    return _filter_split(rows, split, path), columns, os.path.dirname(os.path.abspath(path))


def _jsonl(path: str, split: str | None):
    rows = [item for _, item in jsonio.jsonl_objects(path, DataError)]
    if not rows:
        raise DataError(f"{path}: no rows (an empty JSONL file)")
    columns = sorted({k for r in rows for k in r})
    return _filter_split(rows, split, path), columns, os.path.dirname(os.path.abspath(path))


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading Hugging Face datasets folders and parquet files needs the datasets library: "
            "pip install 'headgain[eval]'"
        ) from None
    return datasets


def _hf(path: str, split: str | None):
    ds = _datasets().load_from_disk(path)
    if hasattr(ds, "keys"):  # a DatasetDict
        splits = list(ds.keys())
        if split is None and len(splits) != 1:
            raise DataError(f"{path} holds the splits {', '.join(splits)}; choose one with split= (--split)")
        name = split if split is not None else splits[0]
        if name not in ds:
            raise DataError(f"{path}: no split {split!r}; splits: {', '.join(splits)}")
        ds = ds[name]
    elif split is not None and ds.split is not None and str(ds.split) != split:
        raise DataError(f"{path} holds the split {ds.split}, not {split!r}")
    return _dataset_rows(ds), list(ds.column_names), path


def _parquet_files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))


def _parquet(path: str, split: str | None):
    files = [path] if os.path.isfile(path) else _parquet_files(path)
    if not files:
        raise DataError(f"{path}: no parquet files; {_FORMATS_TEXT}")
    if split is not None:
        chosen = [f for f in files if os.path.basename(f).split("-")[0].split(".")[0] == split]
        if not chosen:
            names = sorted({os.path.basename(f).split("-")[0].split(".")[0] for f in files})
            raise DataError(f"{path}: no parquet file of split {split!r}; file prefixes found: {', '.join(names)}")
        files = chosen
    else:
        prefixes = sorted({os.path.basename(f).split("-")[0].split(".")[0] for f in files})
        if len(files) > 1 and len(prefixes) > 1:
            raise DataError(
                f"{path} holds parquet files of several splits ({', '.join(prefixes)}); choose one with --split"
            )
    datasets = _datasets()
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Dataset over the tables in memory: the features (Image columns) come from the files'
    # schema metadata, and nothing is written to the datasets cache.
    ds = datasets.Dataset(pa.concat_tables([pq.read_table(f) for f in files]))
    return _dataset_rows(ds), list(ds.column_names), os.path.dirname(os.path.abspath(files[0]))


def _undecoded(feature):
    """``feature`` with every Image feature in it set not to decode (rows then hold the
    compressed bytes; `LazyImages` decodes them on use)."""
    from datasets import Image as ImageFeature

    if isinstance(feature, ImageFeature):
        return ImageFeature(decode=False)
    if hasattr(feature, "feature") and isinstance(feature.feature, ImageFeature):
        return type(feature)(ImageFeature(decode=False))
    return feature


def _dataset_rows(ds) -> Iterator[dict]:
    for name, feature in ds.features.items():
        undecoded = _undecoded(feature)
        if undecoded is not feature:
            ds = ds.cast_column(name, undecoded)
    for i in range(len(ds)):
        yield ds[i]
