"""One record of a LLaVA-format data file, picked by position or id (the inspect views share it)."""
from pathlib import Path

from ..errors import InputError


def pick_record(path, index=None, rid=None) -> dict:
    """Record `index` (or the one whose id is `rid`) of a LLaVA-format JSON / JSONL file."""
    from ..data.dataset import read_records
    if not Path(path).is_file():
        raise InputError(f"data file {path} does not exist")
    records = read_records(path)
    if not isinstance(records, list):
        raise InputError(f"{path}: not a list of records")
    if rid is not None:
        found = [r for r in records if isinstance(r, dict) and str(r.get("id")) == rid]
        if not found:
            raise InputError(f"{path}: no record with id {rid!r}")
        return found[0]
    if not 0 <= index < len(records):
        raise InputError(f"record index {index} is out of range: {path} holds {len(records)} records "
                         f"(--index 0 to {len(records) - 1})")
    return records[index]
