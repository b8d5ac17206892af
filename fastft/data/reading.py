"""JSONL files -> parsed rows with their line numbers, or problems located as PATH:LINE[:COL].

Tolerated without comment: a UTF-8 BOM, CRLF or CR-only line ends, blank lines, very long lines, gzip (by magic
bytes, so ``.jsonl.gz`` and a mis-named gzip both work). Everything else that stops a line from being one JSON
object is an error on that line (a key given twice and NaN / Infinity too: JSON allows neither reliably, and the
last-wins reading would train on something the user may not have meant); problems with the file itself (missing, a
directory, a pipe or device, empty, unreadable, one pretty-printed JSON document instead of JSON Lines) are one
error each.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .report import Issue

_GZIP_MAGIC = b"\x1f\x8b"
_JSON_KIND = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}


@dataclass
class RawRow:
    path: str
    line: int
    obj: dict


@dataclass
class FileRead:
    path: str
    sha256: str | None = None  # of the bytes on disk (compressed, if gzip)
    n_lines: int = 0  # non-blank lines, i.e. rows the user wrote
    rows: list[RawRow] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)


def json_kind(value) -> str:
    return "an object" if isinstance(value, dict) else _JSON_KIND.get(type(value), type(value).__name__)


def read_jsonl(path: str) -> FileRead:
    out = FileRead(path)
    p = Path(path)
    try:
        if not p.exists():
            out.issues.append(Issue(path, None, None, "no such file"))
            return out
        if p.is_dir():
            out.issues.append(Issue(path, None, None, "is a directory; pass the .jsonl files in it instead"))
            return out
        if not p.is_file():  # a pipe may never end (or block until a writer comes) and cannot be read twice
            out.issues.append(Issue(path, None, None, "is not a regular file (a pipe, device or socket); write the "
                                                      "data to a .jsonl file and pass that"))
            return out
        raw = p.read_bytes()
    except OSError as e:
        out.issues.append(Issue(path, None, None, f"cannot read: {e.strerror or e}"))
        return out
    out.sha256 = hashlib.sha256(raw).hexdigest()
    if raw.startswith(_GZIP_MAGIC):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            out.issues.append(Issue(path, None, None, f"not a valid gzip file ({e})"))
            return out
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        out.issues.append(Issue(path, None, None, "file is UTF-16 encoded; save it as UTF-8"))
        return out
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    if b"\r" in raw and b"\n" not in raw:  # old Mac line ends (JSON strings cannot hold a raw CR)
        raw = raw.replace(b"\r", b"\n")

    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            continue
        out.n_lines += 1
        row, issue = _parse_line(path, lineno, line)
        if issue is not None:
            out.issues.append(issue)
        else:
            out.rows.append(row)
    if out.n_lines == 0:
        out.issues.append(Issue(path, None, None, "file is empty"))
    elif out.issues and out.n_lines > 1:
        whole = _whole_document(raw)
        if whole is not None:  # one error per line of it would bury the one problem
            how = f": jq -c '.[]' {path} > rows.jsonl does that" if whole == "array" else ""
            out.rows, out.issues = [], [Issue(path, None, None, (
                f"the file is one JSON {whole} over {out.n_lines:,} lines, not JSON Lines (one object per line); "
                f"write each row on its own line{how}"))]
    return out


def _whole_document(raw: bytes) -> str | None:
    """'array' or 'object' when the whole file is one (pretty-printed) JSON document, else None."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return {list: "array", dict: "object"}.get(type(doc))


def _unique_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _no_constant(name):
    raise ValueError(f"{name} is not valid JSON")


class _DuplicateKey(ValueError):
    pass


def _parse_line(path: str, lineno: int, line: bytes) -> tuple[RawRow | None, Issue | None]:
    nul = line.find(b"\x00")
    if nul >= 0:
        col = len(line[:nul].decode("utf-8", errors="replace")) + 1
        return None, Issue(path, lineno, col, "NUL byte (is this a binary or UTF-16 file?)")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        col = len(line[:e.start].decode("utf-8", errors="replace")) + 1
        return None, Issue(path, lineno, col, f"invalid UTF-8 (byte 0x{line[e.start]:02x}); save the file as UTF-8")
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        msg = "a byte-order mark inside the file (files joined together?)" if "BOM" in e.msg else e.msg
        return None, Issue(path, lineno, e.colno, f"invalid JSON: {msg}")
    except _DuplicateKey as e:
        return None, Issue(path, lineno, None, f"field {e.args[0]!r} given twice in one row")
    except RecursionError:
        return None, Issue(path, lineno, None, "invalid JSON: nested too deeply")
    except ValueError as e:  # NaN / Infinity, or an integer of more digits than Python converts (4300)
        msg = "a number too long to read" if "digits" in str(e) else str(e)
        return None, Issue(path, lineno, None, f"invalid JSON: {msg}")
    if not isinstance(obj, dict):
        hint = " (JSON Lines holds one object per line, not one array)" if isinstance(obj, list) else ""
        return None, Issue(path, lineno, None, f"expected a JSON object, got {json_kind(obj)}{hint}")
    return RawRow(path, lineno, obj), None
