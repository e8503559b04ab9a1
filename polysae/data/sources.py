"""Dataset openers shared by the token chunker (:mod:`polysae.data.chunking`) and the labelled
corpora (:mod:`polysae.data.corpora`): ``hf:NAME[:config][@split]`` specs streamed through
``datasets``, and local ``.parquet`` files read in record batches. A missing text column is a
``ValueError`` naming the column and the columns there are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, NamedTuple

HF_PREFIX = "hf:"
LOCAL_TEXT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
"""Local text files :func:`polysae.data.chunking.iter_texts` reads."""


class HFDatasetSpec(NamedTuple):
    """A parsed ``hf:NAME[:config][@split]`` source."""

    name: str
    """Hub id, local data folder or ``save_to_disk`` folder."""
    config: str | None
    """Dataset configuration (subset) name, or None."""
    split: str
    """Split to read."""


def parse_hf_spec(spec: str, default_split: str = "train") -> HFDatasetSpec:
    """``hf:NAME[:config][@split]`` (the prefix is optional) -> :class:`HFDatasetSpec`."""
    body = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec
    split = default_split
    if "@" in body and "/" not in body.rsplit("@", 1)[1]:
        body, split = body.rsplit("@", 1)
    name, _, config = body.partition(":")
    if not name or not split or (":" in body and not config):
        raise ValueError(f"dataset {spec!r}: expected hf:NAME[:config][@split], e.g. "
                         "hf:wikitext:wikitext-2-raw-v1@validation")
    return HFDatasetSpec(name, config or None, split)


def _saved_to_disk(folder: Path) -> bool:
    return folder.is_dir() and any((folder / n).is_file() for n in
                                   ("dataset_dict.json", "state.json", "dataset_info.json"))


def open_hf_dataset(spec: str, default_split: str = "train") -> Any:
    """The streaming (iterable) ``datasets`` dataset that ``hf:NAME[:config][@split]`` names;
    errors are ``ValueError`` naming the source."""
    hs = parse_hf_spec(spec, default_split)
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ValueError(f"dataset {spec!r}: the `datasets` package is missing") from e
    folder = Path(hs.name).expanduser()
    if _saved_to_disk(folder):
        try:
            ds = datasets.load_from_disk(str(folder))
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"dataset {spec!r}: {folder} looks like a save_to_disk folder but "
                             f"cannot be read ({type(e).__name__}: {e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if hs.split not in ds:
                raise ValueError(f"dataset {spec!r}: {folder} has no split {hs.split!r} (splits: "
                                 f"{sorted(ds)}); name one with @split")
            ds = ds[hs.split]
        return ds.to_iterable_dataset()
    try:
        return datasets.load_dataset(hs.name, hs.config, split=hs.split, streaming=True)
    except Exception as e:  # noqa: BLE001 - hub/builder errors come in many types; report as one
        where = "local folder" if folder.is_dir() else "Hugging Face dataset"
        raise ValueError(f"dataset {spec!r}: cannot stream {where} {hs.name!r}"
                         f"{f' (config {hs.config!r})' if hs.config else ''} split {hs.split!r} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})"
                         ) from None


def dataset_columns(ds: Any) -> list[str] | None:
    """Column names of a Hugging Face dataset (streamed or not); None when it does not say."""
    names = getattr(ds, "column_names", None)
    if names is None and getattr(ds, "features", None) is not None:
        names = list(ds.features)
    return list(names) if names is not None else None


def iter_hf_texts(spec: str, text_column: str | None = None, max_docs: int | None = None,
                  default_split: str = "train") -> Iterator[str]:
    """Texts of a streamed ``hf:`` dataset, in its order, read lazily."""
    ds = open_hf_dataset(spec, default_split)
    col = text_column or "text"
    names = dataset_columns(ds)
    if names is not None and col not in names:
        raise ValueError(f"dataset {spec!r} has no text column {col!r} (columns: {names}); "
                         f"pass --text-column")
    for i, row in enumerate(ds):
        if max_docs is not None and i >= max_docs:
            return
        if col not in row:
            raise ValueError(f"dataset {spec!r} has no text column {col!r} (columns: "
                             f"{sorted(row)}); pass --text-column")
        yield "" if row[col] is None else str(row[col])


def open_parquet(path: str | Path, text_column: str):
    """A local ``.parquet`` file as a ``pyarrow.parquet.ParquetFile`` that has ``text_column``;
    a ValueError names the file when it is unreadable or lacks the column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    names = list(f.schema_arrow.names)
    if text_column not in names:
        raise ValueError(f"{path} has no text column {text_column!r} (columns: {names}); pass "
                         "text_column= / --text-column")
    return f


def iter_parquet_texts(path: str | Path, text_column: str | None = None,
                       max_docs: int | None = None, batch_rows: int = 1024) -> Iterator[str]:
    """Texts of one column of a local ``.parquet`` file, streamed in record batches."""
    f = open_parquet(Path(path), text_column or "text")
    n = 0
    for batch in f.iter_batches(batch_size=batch_rows, columns=[text_column or "text"]):
        for v in batch.column(0).to_pylist():
            if max_docs is not None and n >= max_docs:
                return
            n += 1
            yield "" if v is None else str(v)
