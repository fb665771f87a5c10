"""WebDataset shard I/O shared by the loader, the shard writer and evaluation.

One place for what a shard looks like on disk and how it is read:

* shard specs: a path, a brace pattern (``/data/{00000..00331}.tar``), a ``::``-joined list
  of those, any URL webdataset's ``gopen`` opens (``pipe:aws s3 cp s3://b/00001.tar -``,
  ``file:``, ``http(s):``), or a Python list of any of these (:func:`expand_shards`);
* local versus remote shards (:func:`is_local`, :func:`local_path`, :func:`shard_basename`);
* tar iteration into webdataset-style samples (:func:`iter_tar_samples`);
* the files beside the shards: ``sizes.json`` (``{basename: count}``), img2dataset's
  ``NNNNN_stats.json`` and ``glofnd_index.json`` (:func:`read_shard_sizes`);
* the members of a sample: the image (:data:`IMAGE_KEYS`), the caption
  (:data:`CAPTION_KEYS`), the dataset index (``KEY.idx``, else ``dataset_index`` in
  ``KEY.json``) and the ``KEY.json`` metadata.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal
from urllib.parse import urlparse

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

__all__ = [
    "CAPTION_KEY",
    "CAPTION_KEYS",
    "IMAGE_KEYS",
    "INDEX_FIELD",
    "INDEX_INFO_FILE",
    "INDEX_KEY",
    "META_KEY",
    "SIZES_FILE",
    "TruncatedShardError",
    "check_local_shards_exist",
    "dataset_size_from_files",
    "expand_shards",
    "find_image",
    "is_local",
    "iter_tar_samples",
    "local_path",
    "read_caption",
    "read_dataset_index",
    "read_metadata",
    "read_shard_sizes",
    "shard_basename",
]

#: Sample members that may hold the image, in order of preference.
IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
#: The caption member the writer writes (UTF-8 text).
CAPTION_KEY = "txt"
#: Sample members read as the caption, in order of preference: what the writer and
#: img2dataset write, and what other tools name it.
CAPTION_KEYS: tuple[str, ...] = (CAPTION_KEY, "text", "caption")
#: The dataset index as decimal text (what the loader reads first).
INDEX_KEY = "idx"
#: JSON metadata of a sample; may hold :data:`INDEX_FIELD`, an image id, labels.
META_KEY = "json"
INDEX_FIELD = "dataset_index"

SIZES_FILE = "sizes.json"
INDEX_INFO_FILE = "glofnd_index.json"

_INT_RE = re.compile(r"^[+-]?[0-9]+$")
_META_RE = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped
_TAR_SUFFIX_RE = re.compile(r"\.(tar|tgz)(\.[A-Za-z0-9]+)?$")


# --------------------------------------------------------------------------- shard lists


def is_local(url: str) -> bool:
    """True for plain paths and ``file:`` URLs (shards whose neighbours we can list)."""
    return urlparse(url).scheme in ("", "file")


def local_path(url: str) -> str:
    """The filesystem path of a local shard (``file:`` URLs unwrapped)."""
    return re.sub(r"^file://?", "/", url) if url.startswith("file:") else url


def shard_basename(url: str) -> str:
    """The shard's file name: the key of ``sizes.json`` and the name the writer copies to."""
    if is_local(url):
        return os.path.basename(local_path(url))
    # pipe:/http: URLs: the last token that looks like a tar file name
    found = re.findall(r"([^/\s'\"]+\.(?:tar|tgz)(?:\.[A-Za-z0-9]+)?)", url)
    return found[-1] if found else os.path.basename(url.split()[-1] if url.split() else url)


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Expand a shard spec (brace patterns, ``::`` lists, ``${WDS_VAR}``) into a list."""
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"shard spec entries must be str, got {type(item).__name__}")
        for url in expand_urls(item):
            url = url.strip()
            if url:
                urls.append(os.path.expanduser(url) if is_local(url) else url)
    if not urls:
        raise ValueError(f"shard spec {spec!r} expands to no shards")
    return urls


def check_local_shards_exist(
    spec: str | Sequence[str], urls: Sequence[str], setting: str = "train_shards"
) -> None:
    """Raise :class:`~glofnd_hf.data.errors.DataError` naming the first local shard of
    ``urls`` (expanded from ``spec``) that is not a file. Remote URLs (``pipe:``, ``http:``)
    are not checked: reading them reports their failures."""
    from .errors import DataError

    local = [u for u in urls if is_local(u)]
    missing = [u for u in local if not os.path.exists(local_path(u))]
    if missing:
        hint = f"check {setting} (the folder and the brace range)"
        if any(c in local_path(u) for u in missing for c in "*?["):
            hint += (
                "; glob patterns are not expanded: write a brace range such as "
                "/data/{00000..00099}.tar or a '::'-joined list"
            )
        if len(missing) == len(urls):
            shown = repr(spec) if isinstance(spec, str) else f"{len(urls)} shard(s)"
            raise DataError(
                f"shard pattern {shown} matches no file (the first looked for: "
                f"{missing[0]!r}): {hint}"
            )
        verb = "does" if len(missing) == 1 else "do"
        raise DataError(
            f"{len(missing)} of the {len(urls)} shards {verb} not exist (the first: "
            f"{missing[0]!r}): {hint}, or restore the files"
        )
    folders = [u for u in local if os.path.isdir(local_path(u))]
    if folders:
        raise DataError(
            f"shard {folders[0]!r} is a folder, not a tar file: {setting} names the shard "
            "files, e.g. /data/{00000..00099}.tar"
        )


# --------------------------------------------------------------------------- tar reading


class TruncatedShardError(ValueError):
    """A tar shard that ends before its end-of-archive marker (cut or corrupt)."""


class _CountingReader:
    """A read-only stream that counts the bytes read and where the last non-NUL byte was,
    so that the end of a tar archive can be checked after ``tarfile`` stopped reading."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.count = 0
        self.data_end = 0  # position just after the last non-NUL byte read

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read() if size is None or size < 0 else self.raw.read(size)
        if data:
            stripped = len(data.rstrip(b"\0"))
            if stripped:
                self.data_end = self.count + stripped
            self.count += len(data)
        return data

    def drain(self, chunk: int = 1 << 20) -> None:
        while self.read(chunk):
            pass


def _decompressed(raw: Any) -> Any:
    """``raw``, decompressed when it starts with a gzip, bzip2 or xz signature (what
    tarfile's ``r|*`` accepts), as a stream whose ``read`` returns the tar bytes."""
    import bz2
    import gzip
    import lzma

    head = raw.read(6)
    stream = _Prefixed(head, raw)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(stream, mode="rb")
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(stream, mode="rb")
    return stream


class _Prefixed:
    """``prefix`` followed by the rest of ``raw`` (the bytes read to sniff compression)."""

    def __init__(self, prefix: bytes, raw: Any) -> None:
        self.prefix = prefix
        self.raw = raw

    def read(self, size: int = -1) -> bytes:
        if self.prefix:
            if size is None or size < 0:
                data, self.prefix = self.prefix + self.raw.read(), b""
                return data
            data, self.prefix = self.prefix[:size], self.prefix[size:]
            if len(data) < size:
                data += self.raw.read(size - len(data))
            return data
        return self.raw.read() if size is None or size < 0 else self.raw.read(size)


def _tar_members(stream: Any) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular files of a tar stream, then a check that the archive
    ended with its end-of-archive marker: ``tarfile`` stops silently when the data ends at a
    header (a cut at a 512-byte boundary, or within a header) or at an unreadable header;
    such a shard raises :class:`TruncatedShardError`."""
    reader = _CountingReader(_decompressed(stream))
    tar = tarfile.open(fileobj=reader, mode="r|")
    for info in tar:
        if not info.isreg() or info.name is None:
            continue
        if _META_RE.match(info.name):
            continue
        member = tar.extractfile(info)
        data = member.read() if member is not None else b""
        if len(data) != info.size:
            raise TruncatedShardError(f"member {info.name!r} is cut short")
        yield info.name, data
        tar.members = []  # stream mode: do not keep every member's header
    end = tar.offset  # where the next header would start: the end-of-archive marker
    reader.drain()
    if reader.count < end + tarfile.BLOCKSIZE:
        raise TruncatedShardError(
            f"the archive ends at byte {reader.count} without its end-of-archive marker "
            f"(after {end} bytes of complete members): the shard is truncated"
        )
    if reader.data_end > end:
        raise TruncatedShardError(
            f"unreadable tar header at byte {end}: the shard is corrupt (data follows "
            f"up to byte {reader.data_end})"
        )


def iter_tar_samples(
    url: str, on_error: Callable[[str, str | None, Exception], None]
) -> Iterator[dict[str, Any]]:
    """Yield webdataset-style samples (``__key__``, ``__url__``, ``ext: bytes``) of one shard.

    Consecutive members sharing a key (``base_plus_ext``) form a sample.  If reading
    fails (truncated/corrupt tar wherever it is cut, a failing ``pipe:``),
    ``on_error(url, key, exc)`` is called, the incomplete sample is dropped and iteration
    of this shard stops.  The last sample is yielded only once the archive's end was found
    intact: a cut between two members of one sample does not pass it on incomplete.
    """
    stream = None
    current: dict[str, Any] | None = None
    try:
        stream = gopen(url, "rb")
        for name, data in _tar_members(stream):
            prefix, suffix = base_plus_ext(name)
            if prefix is None:
                continue
            if current is None or current["__key__"] != prefix:
                if current is not None:
                    yield current
                current = {"__key__": prefix, "__url__": url}
            current[suffix.lower()] = data
        if current is not None:
            sample, current = current, None
            yield sample
    except Exception as exc:  # noqa: BLE001 - reported, shard skipped
        on_error(url, None if current is None else current["__key__"], exc)
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - e.g. pipe exit status after early stop
                pass


# --------------------------------------------------------------------------- sample members


def read_caption(sample: Mapping[str, Any], keys: Sequence[str] = CAPTION_KEYS) -> str | None:
    """The stripped caption of the first caption member present; None if it is missing,
    empty or not UTF-8 (later keys are not consulted once one is present)."""
    for key in keys:
        if key in sample:
            try:
                caption = sample[key].decode("utf-8").strip()
            except UnicodeDecodeError:
                return None
            return caption or None
    return None


def find_image(sample: Mapping[str, Any], keys: Sequence[str] = IMAGE_KEYS) -> bytes | None:
    """The encoded bytes of the first image member present, else None."""
    return next((sample[key] for key in keys if key in sample), None)


def read_metadata(sample: Mapping[str, Any]) -> dict[str, Any]:
    """The sample's ``.json`` as a dict (``{}`` when absent or not an object).

    Raises ``ValueError`` when the member is not UTF-8 JSON.
    """
    raw = sample.get(META_KEY)
    if raw is None:
        return {}
    meta = json.loads(raw.decode("utf-8"))  # UnicodeDecodeError / JSONDecodeError: ValueError
    return meta if isinstance(meta, dict) else {}


def read_dataset_index(
    sample: Mapping[str, Any], source: Literal["field", "key"] = "field"
) -> tuple[int | None, str]:
    """``(index, reason)``: the sample's dataset index, or None and why it has none.

    ``source="field"``: the ``.idx`` member (decimal text), else ``dataset_index`` in the
    ``.json``.  ``source="key"``: ``int`` of the sample key's basename (img2dataset keys).
    """
    if source == "key":
        key = os.path.basename(sample["__key__"])
        if _INT_RE.match(key) and key.isascii():
            return int(key), ""
        return None, f"key {key!r} is not an integer"
    raw = sample.get(INDEX_KEY)
    if raw is not None:
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None, "'.idx' entry is not UTF-8 text"
        if _INT_RE.match(text):
            return int(text), ""
        return None, f"'.idx' entry {text[:40]!r} is not an integer"
    meta = sample.get(META_KEY)
    if meta is not None:
        try:
            value = json.loads(meta).get(INDEX_FIELD)
        except (ValueError, AttributeError):
            return None, "no '.idx' entry and '.json' entry is not a JSON object"
        if value is None:
            return None, "no '.idx' entry and no 'dataset_index' in '.json'"
        if isinstance(value, int) and not isinstance(value, bool):
            return value, ""
        if isinstance(value, str) and _INT_RE.match(value.strip()):
            return int(value.strip()), ""
        return None, f"'dataset_index' {value!r} in '.json' is not an integer"
    return None, "no '.idx' entry and no '.json' entry with 'dataset_index'"


# --------------------------------------------------------------------------- sizes and index files


def _load_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_shard_sizes(
    urls: Sequence[str], sizes_file: str | None = None
) -> tuple[dict[str, int | None], dict[str, Any]]:
    """Per-shard sample counts for ``urls`` (None where unknown) and what was found.

    Lookup per shard: ``sizes_file`` (by basename), ``sizes.json`` in the shard's
    directory, img2dataset's ``<stem>_stats.json`` (``successes``).  The second
    return value has ``dirs`` (directories holding sizes/index files),
    ``sizes_total`` (sum of all entries of the sizes files found),
    ``index_info`` (``glofnd_index.json`` contents per directory).
    """
    files: dict[str, dict[str, int]] = {}  # realpath -> {basename: count}, each read once
    index_info: dict[str, Any] = {}  # directory -> glofnd_index.json
    dirs_seen: set[str] = set()

    def load_sizes(path: str) -> dict[str, int]:
        real = os.path.realpath(path)
        if real not in files:
            files[real] = {str(k): int(v) for k, v in _load_json(path).items()}
        return files[real]

    def scan_dir(directory: str) -> None:
        if directory in dirs_seen:
            return
        dirs_seen.add(directory)
        if os.path.isfile(os.path.join(directory, SIZES_FILE)):
            load_sizes(os.path.join(directory, SIZES_FILE))
        info_path = os.path.join(directory, INDEX_INFO_FILE)
        if os.path.isfile(info_path):
            index_info[directory] = _load_json(info_path)

    explicit: dict[str, int] = {}
    if sizes_file is not None:
        explicit = load_sizes(sizes_file)
        scan_dir(os.path.dirname(os.path.realpath(sizes_file)))
    result: dict[str, int | None] = {}
    for url in urls:
        base = shard_basename(url)
        result[url] = explicit.get(base)
        if result[url] is not None or not is_local(url):
            continue
        directory = os.path.dirname(os.path.realpath(local_path(url)))
        scan_dir(directory)
        sizes_path = os.path.realpath(os.path.join(directory, SIZES_FILE))
        if base in files.get(sizes_path, {}):
            result[url] = files[sizes_path][base]
            continue
        stats = os.path.join(directory, _TAR_SUFFIX_RE.sub("", base) + "_stats.json")
        if os.path.isfile(stats):
            result[url] = int(_load_json(stats)["successes"])
    found_dirs = sorted({os.path.dirname(f) for f in files} | set(index_info))
    sizes_total = sum(sum(f.values()) for f in files.values()) if files else None
    return result, {"dirs": found_dirs, "sizes_total": sizes_total, "index_info": index_info}


def dataset_size_from_files(
    sizes: Mapping[str, int | None],
    found: Mapping[str, Any],
    index_source: Literal["field", "key"] = "field",
) -> tuple[int, str]:
    """N as the files beside the shards give it (:func:`read_shard_sizes`' two results), and
    where it came from: ``glofnd_index.json``'s ``dataset_size``, else the sum of the
    ``sizes.json`` entries, else of the shards' ``_stats.json`` counts. Raises ``ValueError``
    when N cannot be inferred: key mode (sparse keys), several folders with their own index
    files, or no count at all."""
    if index_source == "key":
        raise ValueError(
            "index_source='key' needs an explicit dataset_size N > the largest numeric key "
            "(img2dataset keys are shard_id * 10**k + row, e.g. N = num_shards * 10**k)"
        )
    if len(found["dirs"]) > 1:
        raise ValueError(
            f"shards come from several directories with their own index files {found['dirs']}: "
            "their indices may collide; pass dataset_size explicitly (and make indices "
            "disjoint, e.g. with add_index_to_shards(start_index=...))"
        )
    infos = list(found["index_info"].items())
    if infos and "dataset_size" in infos[0][1]:
        where = f"{INDEX_INFO_FILE} in {infos[0][0]}"
        return int(infos[0][1]["dataset_size"]), f"dataset_size in {where}"
    if found["sizes_total"] is not None:
        return int(found["sizes_total"]), f"the counts of {SIZES_FILE} beside the shards"
    if all(n is not None for n in sizes.values()):
        total = int(sum(n for n in sizes.values() if n is not None))
        return total, "the _stats.json counts beside the shards"
    raise ValueError(
        "cannot infer dataset_size (N): no glofnd_index.json / sizes.json beside the shards; "
        "pass dataset_size (glofnd-train: num_samples)"
    )
