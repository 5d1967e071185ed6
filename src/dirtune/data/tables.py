"""Tables read through `datasets`: .parquet and .arrow files, and folders that
`Dataset.save_to_disk` wrote. records.py makes each row a `Record` numbered by row (1-based), so
that messages say "row 7", and checks them like JSON records.

`datasets` (and pyarrow under it) is imported only here, when such a file is read.
"""

from __future__ import annotations

from pathlib import Path

from dirtune.data.errors import DataError

SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes beside the .arrow files


def is_saved_dataset(folder: Path) -> bool:
    return any((folder / m).is_file() for m in SAVED_MARKERS)


def table_rows(path: str | Path, kind: str) -> list[dict]:
    """The rows of a .parquet/.arrow file or a save_to_disk folder, in order (records.py numbers
    them as records); DataError if the file cannot be read or holds no rows."""
    import datasets

    p = Path(path)
    try:
        if kind == "saved":
            if (p / "dataset_dict.json").is_file():
                splits = sorted(q.name for q in p.iterdir() if q.is_dir())
                raise DataError(f"{p}: holds several splits ({', '.join(splits)}); give one split's "
                                f"folder, e.g. {p / (splits[0] if splits else 'train')}")
            table = datasets.load_from_disk(str(p))
        elif kind == "parquet":
            # pyarrow reads it in memory; datasets' parquet builder would write a cache copy
            import pyarrow.parquet as pq

            table = datasets.Dataset(pq.read_table(str(p)))
        else:
            table = _arrow(p)
    except DataError:
        raise
    except Exception as e:  # pyarrow and datasets raise many types for a damaged or foreign file
        raise DataError(f"{p}: cannot be read as {kind if kind != 'saved' else 'a saved dataset'} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no detail'})") from None
    if len(table) == 0:
        raise DataError(f"{p}: empty, no records")
    return table.to_list()


def _arrow(path: Path):
    """An .arrow file: the streaming format datasets writes (Dataset.from_file), else the Arrow
    IPC file format (what pyarrow.feather / ipc.new_file writes)."""
    import datasets
    import pyarrow as pa

    try:
        return datasets.Dataset.from_file(str(path), in_memory=True)
    except (pa.ArrowInvalid, OSError):
        with pa.memory_map(str(path)) as source:
            return datasets.Dataset(pa.ipc.open_file(source).read_all())
