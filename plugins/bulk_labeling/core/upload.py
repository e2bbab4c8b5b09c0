"""Upload with concepts: import media and label it in the same bulk write.

Two sources, which can be mixed in one call:

-   **server paths**: files, directories (walked recursively by default) and
    glob patterns, read in place;
-   **browser files**: ``{"name", "content"}`` dicts with base64 content (what
    the App's file input sends), written under ``media_dir`` with safe,
    unique names.

Every file is checked before anything is written: it is opened with PIL and
decoded (JPEGs at 1/8 scale, which still runs the whole entropy-coded stream
through libjpeg), so non-media, corrupt, unreadable and missing files are
skipped and reported with a reason. The same pass yields the media metadata
(width, height, channels, MIME type, size), so no second read is needed.

The valid files become sample documents carrying their concepts (a
``Classifications`` field) and the JSON metadata, and are inserted in one
journaled bulk write (see :mod:`bulk_labeling.core.history`): the samples'
ids are generated first and stored as the operation's targets, so a crash
mid-insert leaves the operation ``pending`` and ``undo`` deletes whatever was
inserted.
"""

import base64
import binascii
import concurrent.futures
import datetime
import glob
import itertools
import logging
import mimetypes
import os
import random
import re
import secrets
import stat
import unicodedata

import fiftyone as fo
import fiftyone.core.utils as fou
from bson import ObjectId

from . import concepts as conc
from . import database as db
from . import history
from . import metadata as meta
from .errors import BulkLabelingError
from .progress import Progress

logger = logging.getLogger(__name__)

OPERATION_TYPE = "upload"

DEFAULT_FIELD = conc.DEFAULT_FIELD
DEFAULT_METADATA_FIELD = meta.DEFAULT_FIELD

#: The largest browser file accepted, in bytes (decoded)
MAX_FILE_BYTES = 32 * 1024 * 1024

#: The largest total of browser files accepted in one call, in bytes
MAX_TOTAL_BYTES = 256 * 1024 * 1024

#: Sample documents per ``insert_many`` call (one progress step each)
INSERT_BATCH_SIZE = 10_000

#: Files per task of the checking thread pool
_CHECK_CHUNK = 64

#: The most characters kept of an uploaded file's name (stem)
_MAX_NAME = 100

_GLOB_CHARS = re.compile(r"[*?\[]")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_DATA_URL = re.compile(r"^data:([^;,]*)(;[^,]*)?,", re.IGNORECASE)

# Leading bytes of common image formats: a file that starts like an image
# but cannot be decoded is reported as corrupt rather than as non-media
_IMAGE_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG",
    b"GIF8",
    b"BM",
    b"II*\x00",  # TIFF
    b"MM\x00*",
    b"RIFF",  # WebP
)

_FORMAT_MIME = {"MPO": "image/jpeg"}


def default_media_dir(dataset):
    """The folder where browser uploads of a dataset are written by default:
    ``<fo.config.default_dataset_dir>/<dataset slug>/uploads``."""
    return os.path.join(
        fo.config.default_dataset_dir, dataset.slug, "uploads"
    )


def iter_upload(dataset, paths=None, files=None, concepts=None,
                metadata=None, field=DEFAULT_FIELD,
                metadata_field=DEFAULT_METADATA_FIELD, recursive=True,
                skip_existing=True, media_dir=None,
                max_file_bytes=MAX_FILE_BYTES,
                max_total_bytes=MAX_TOTAL_BYTES, num_workers=None,
                dry_run=False, user=None, target=None):
    """Imports media with concepts and metadata in one journaled bulk write.

    A generator of :class:`bulk_labeling.core.progress.Progress` events; use
    :func:`upload` for a plain call. See :func:`upload` for the arguments.

    Returns:
        ``{"operation_id", "added", "skipped", "index"}`` (+ ``"media_dir"``
        when browser files were written, ``"dry_run": True`` for a dry run)
    """
    # 1. Validate every parameter; nothing is written before step 3
    dataset = _require_image_dataset(dataset)
    concepts = conc.normalize_concepts(concepts, allow_empty=True)
    conc.validate_field(dataset, field)
    payload = _parse_metadata(dataset, metadata, metadata_field, field)
    paths = _normalize_paths(paths)
    uploads = _decode_files(files, max_file_bytes, max_total_bytes)
    if not paths and not uploads:
        raise BulkLabelingError(
            "Nothing to upload: give server paths and/or browser files"
        )

    if uploads:
        media_dir = _check_media_dir(media_dir or default_media_dir(dataset))
    else:
        media_dir = None

    # 2. Find and check the files
    skipped = []
    candidates = _expand_paths(paths, recursive, skipped)
    if skip_existing and candidates:
        existing = _existing_filepaths(dataset, candidates)
        kept = []
        for path in candidates:
            if path in existing:
                skipped.append(
                    {"path": path, "reason": "already in the dataset"}
                )
            else:
                kept.append(path)
        candidates = kept

    sources = [("path", p) for p in candidates]
    for upload_ in uploads:
        if upload_["error"]:
            skipped.append({"path": upload_["name"], "reason": upload_["error"]})
        else:
            sources.append(("upload", upload_))

    num_sources = len(sources)
    total = 2 * num_sources
    valid = []
    checked = 0
    for results in _check_all(sources, num_workers):
        for (kind, source), (info, reason) in results:
            if reason is None:
                valid.append((kind, source, info))
            else:
                name = source if kind == "path" else source["name"]
                skipped.append({"path": name, "reason": reason})
        checked += len(results)
        yield Progress(checked, total, "Checking files (step 1 of 2)")

    result = {
        "operation_id": None,
        "added": len(valid),
        "skipped": skipped,
        "index": None,
    }
    if dry_run:
        result["dry_run"] = True
        return result

    if not valid:
        # Nothing to add is not an error: every skipped file is reported
        return result

    # 3. Declare the schema, then write the browser files
    if payload:
        # Declares the field and the payload's top-level keys (sidebar
        # filters); it raises before anything else is written
        meta.ensure_metadata_field(dataset, metadata_field, [payload])

    if dataset.media_type is None:
        dataset.media_type = fo.core.media.IMAGE

    if concepts:
        conc.ensure_field(dataset, field)
        conc.add_to_vocabulary(dataset, field, concepts)

    written = []
    try:
        filepaths = []
        for kind, source, info in valid:
            if kind == "path":
                filepaths.append(source)
            else:
                path = _write_upload(media_dir, source, info)
                written.append(path)
                filepaths.append(path)
                source["data"] = None  # free memory as we go
    except Exception:
        _remove_files(written)
        raise

    # 4. The journaled bulk insert
    ids = [ObjectId() for _ in valid]
    docs = _DocFactory(dataset, concepts, field, payload, metadata_field)
    params = {
        "paths": paths[:20],
        "num_paths": len(paths),
        "files": [u["name"] for u in uploads][:20],
        "num_files": len(uploads),
        "concepts": concepts,
        "field": field,
        "metadata": payload,
        "metadata_field": metadata_field,
        "recursive": bool(recursive),
        "skip_existing": bool(skip_existing),
        "media_dir": media_dir,
        "num_skipped": len(skipped),
    }

    inserting = []

    def writer(dataset, op):
        inserting.append(True)
        done = num_sources
        scale = num_sources / len(valid)
        offset = 0
        for seq, batch in op.iter_pending_batches():
            batch_ids = batch.ids
            inserted = 0
            for start in range(0, len(batch_ids), INSERT_BATCH_SIZE):
                chunk = batch_ids[start:start + INSERT_BATCH_SIZE]
                base = offset + start
                db.sample_coll(dataset).insert_many(
                    [
                        docs.make(_id, filepaths[base + i], valid[base + i][2])
                        for i, _id in enumerate(chunk)
                    ],
                    ordered=False,
                )
                inserted += len(chunk)
                yield Progress(
                    done + int((base + len(chunk)) * scale),
                    total,
                    "Adding samples (step 2 of 2)",
                )

            op.batch_done(seq, len(batch_ids), inserted)
            offset += len(batch_ids)

    id_batches = [
        ids[i:i + db.ID_BATCH_SIZE] for i in range(0, len(ids), db.ID_BATCH_SIZE)
    ]
    try:
        op = yield from history.run_operation(
            dataset,
            OPERATION_TYPE,
            params,
            [{"kind": "delete_samples"}],
            id_batches,
            writer,
            target=target or {"kind": "upload", "media_dir": media_dir},
            user=user,
        )
    except Exception:
        if not inserting:
            # Nothing references the browser files yet
            _remove_files(written)
        else:
            logger.warning(
                "Upload to dataset '%s' was interrupted; run "
                "bulk_labeling.undo(dataset) to delete the samples it added",
                dataset.name,
            )
        raise

    result["operation_id"] = op.operation_id
    result["index"] = _sync_similarity_index(dataset, ids)
    if media_dir is not None:
        result["media_dir"] = media_dir

    return result


def upload(dataset, paths=None, concepts=None, metadata=None,
           field=DEFAULT_FIELD, metadata_field=DEFAULT_METADATA_FIELD,
           recursive=True, skip_existing=True, files=None, media_dir=None,
           max_file_bytes=MAX_FILE_BYTES, max_total_bytes=MAX_TOTAL_BYTES,
           num_workers=None, dry_run=False, progress=None):
    """Imports images into a dataset with concepts and metadata, in one
    journaled bulk write that :func:`bulk_labeling.undo` can revert.

    Every file is opened and decoded first; non-media, corrupt, unreadable
    and missing files are skipped and reported. Concepts not yet in
    ``dataset.classes[field]`` are created on the spot.

    Example::

        import bulk_labeling as bl

        result = bl.upload(
            dataset,
            ["/data/new_photos", "/data/more/**/*.jpg"],
            concepts=["cat", "indoor"],
            metadata={"source": "camera-3", "batch": 7},
        )
        batch = bl.uploaded_view(dataset, result["operation_id"])

    Args:
        dataset: a :class:`fiftyone.core.dataset.Dataset` (of images, or
            empty)
        paths (None): a path or list of server paths: files, directories
            and glob patterns (``**`` matches any depth)
        concepts (None): a concept or list of concepts for every new sample
        metadata (None): a JSON object (dict or JSON text) stored in
            ``metadata_field`` of every new sample, validated like
            :func:`bulk_labeling.core.metadata.parse_metadata` and against
            the dataset's metadata schema, if any
        field ("concepts"): the Classifications field of the concepts
        metadata_field ("custom_metadata"): the field of the metadata
        recursive (True): whether directories are walked recursively
        skip_existing (True): whether files whose path is already in the
            dataset are skipped (and reported) rather than added again
        files (None): browser files: a list of ``{"name", "content"}``
            dicts with base64 (or data URL) content, ``bytes`` content, or
            ``(name, bytes)`` tuples. They are written under ``media_dir``
        media_dir (None): where browser files are written; by default
            :func:`default_media_dir`
        max_file_bytes (32 MiB): the largest browser file accepted
        max_total_bytes (256 MiB): the largest total of browser files
        num_workers (None): threads used to check files
        dry_run (False): check everything and report what would be added,
            writing nothing
        progress (None): whether to render a progress bar, or a callback

    Returns:
        ``{"operation_id", "added", "skipped": [{"path", "reason"}],
        "index"}``: ``operation_id`` is None when nothing was added;
        ``index`` is the similarity index's update message, if any
    """
    from .progress import run

    return run(
        iter_upload(
            dataset,
            paths=paths,
            files=files,
            concepts=concepts,
            metadata=metadata,
            field=field,
            metadata_field=metadata_field,
            recursive=recursive,
            skip_existing=skip_existing,
            media_dir=media_dir,
            max_file_bytes=max_file_bytes,
            max_total_bytes=max_total_bytes,
            num_workers=num_workers,
            dry_run=dry_run,
        ),
        progress=progress,
    )


def uploaded_sample_ids(dataset, operation_id):
    """Returns the ids (strings) of the samples an upload added, read from
    the operation's journal."""
    op = history.Operation.load(dataset, operation_id)
    if op.type != OPERATION_TYPE:
        raise BulkLabelingError(
            "Operation %s is a %s, not an upload" % (operation_id, op.type)
        )

    return [str(i) for _, ids in op.iter_target_batches() for i in ids.ids]


def uploaded_view(dataset, operation_id):
    """Returns a view of the samples that an upload added (those that still
    exist), in upload order."""
    dataset = getattr(dataset, "_dataset", dataset)
    return dataset.select(
        uploaded_sample_ids(dataset, operation_id), ordered=True
    )


# -- validation -------------------------------------------------------------


def _require_image_dataset(dataset):
    if not hasattr(dataset, "_sample_collection"):
        raise BulkLabelingError("Uploads need a FiftyOne dataset")

    dataset = dataset._dataset
    db.require_sample_view(dataset)
    if dataset.media_type not in (None, fo.core.media.IMAGE):
        raise BulkLabelingError(
            "Uploads add images; dataset '%s' holds %s samples"
            % (dataset.name, dataset.media_type)
        )

    return dataset


def _parse_metadata(dataset, metadata, metadata_field, concepts_field):
    if metadata is None or (isinstance(metadata, str) and not metadata.strip()):
        return None

    # Validates the name, and the type of an existing field, writing nothing
    meta.check_metadata_field(dataset, metadata_field)
    if metadata_field == concepts_field:
        raise BulkLabelingError(
            "Concepts and metadata cannot share the field '%s'" % metadata_field
        )

    payload = meta.parse_metadata(metadata)
    if not payload:
        return None

    meta.validate_documents(dataset, metadata_field, [("new samples", payload)])
    return payload


def _normalize_paths(paths):
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike, dict)):
        paths = [paths]

    result = []
    for path in paths:
        if isinstance(path, dict):
            # FiftyOne's FileExplorerView sends a File object
            path = path.get("absolute_path") or path.get("path")
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if path is None or (isinstance(path, str) and not path.strip()):
            continue
        if not isinstance(path, str):
            raise BulkLabelingError("Paths must be strings, not %r" % (path,))
        if "\x00" in path:
            raise BulkLabelingError("Path %r contains a NUL character" % path)
        if path not in result:
            result.append(path.strip())

    return result


def _human(num_bytes):
    return "%.1f MiB" % (num_bytes / (1024 * 1024))


def _decode_files(files, max_file_bytes, max_total_bytes):
    """Decodes browser files in memory. Structural problems and size limits
    are errors; content that is not base64 is a skipped file."""
    if files is None:
        return []
    if isinstance(files, (dict, tuple, str)):
        files = [files]

    uploads = []
    total = 0
    for index, item in enumerate(files):
        name, content = _file_fields(item, index)
        upload_ = {"name": name, "data": None, "error": None}
        uploads.append(upload_)
        if isinstance(content, str):
            content, mime = _strip_data_url(content)
            upload_["mime"] = mime
            estimate = len(content) * 3 // 4
            if estimate > max_file_bytes + 3:
                _too_large(name, estimate, max_file_bytes)
            try:
                data = base64.b64decode("".join(content.split()), validate=True)
            except (binascii.Error, ValueError):
                upload_["error"] = "content is not valid base64"
                continue
        else:
            data = bytes(content)

        if len(data) > max_file_bytes:
            _too_large(name, len(data), max_file_bytes)

        total += len(data)
        if total > max_total_bytes:
            raise BulkLabelingError(
                "The uploaded files total more than %s, the limit per upload;"
                " upload them in several batches, or copy them to the server"
                " and import them by path" % _human(max_total_bytes)
            )

        if not data:
            upload_["error"] = "empty file"
            continue

        upload_["data"] = data

    return uploads


def _too_large(name, size, limit):
    raise BulkLabelingError(
        "File '%s' is %s; the limit is %s per uploaded file. Copy it to the "
        "server and import it by path instead" % (name, _human(size), _human(limit))
    )


def _file_fields(item, index):
    if isinstance(item, tuple) and len(item) == 2:
        name, content = item
    elif isinstance(item, str):
        name, content = None, item
    elif isinstance(item, dict):
        if isinstance(item.get("file"), dict):
            item = item["file"]
        name = item.get("name")
        content = item.get("content")
    else:
        raise BulkLabelingError(
            "Uploaded file #%d must be an object with a name and a base64 "
            "content" % (index + 1)
        )

    if name is None:
        name = "upload-%d" % (index + 1)
    if not isinstance(name, str):
        raise BulkLabelingError(
            "The name of uploaded file #%d must be a string" % (index + 1)
        )
    if content is None:
        raise BulkLabelingError(
            "Uploaded file '%s' has no content (the App must send it in "
            "full, not 'lite')" % name
        )
    if not isinstance(content, (str, bytes, bytearray, memoryview)):
        raise BulkLabelingError(
            "The content of uploaded file '%s' must be base64 text or bytes"
            % name
        )

    return name, content


def _strip_data_url(content):
    match = _DATA_URL.match(content)
    if match is None:
        return content, None
    return content[match.end():], match.group(1) or None


def _check_media_dir(media_dir):
    media_dir = os.path.abspath(os.path.expanduser(os.fspath(media_dir)))
    if os.path.exists(media_dir) and not os.path.isdir(media_dir):
        raise BulkLabelingError(
            "The media folder '%s' exists and is not a folder" % media_dir
        )
    return media_dir


# -- finding files ----------------------------------------------------------


def _expand_paths(paths, recursive, skipped):
    """Expands files, directories and glob patterns into absolute file paths,
    deduplicated, in a stable order."""
    found = []
    seen = set()

    def add(path):
        path = os.path.abspath(path)
        if path not in seen:
            seen.add(path)
            found.append(path)

    for raw in paths:
        path = os.path.expanduser(raw)
        if os.path.isdir(path):
            for p in _walk(path, recursive):
                add(p)
        elif os.path.isfile(path):
            add(path)
        elif os.path.lexists(path):
            # A broken link, a socket, ... is reported by the check
            add(path)
        elif _GLOB_CHARS.search(path):
            matches = sorted(glob.glob(path, recursive=True))
            files = []
            for match in matches:
                if os.path.isdir(match):
                    files.extend(_walk(match, recursive))
                else:
                    files.append(match)
            if not files:
                skipped.append({"path": raw, "reason": "no file matches this pattern"})
            for p in files:
                add(p)
        else:
            skipped.append({"path": raw, "reason": "file not found"})

    return found


def _walk(root, recursive):
    """The files under a directory, hidden files and folders excluded."""
    if not recursive:
        with os.scandir(root) as entries:
            names = sorted(
                e.name for e in entries
                if not e.name.startswith(".") and not e.is_dir()
            )
        return [os.path.join(root, n) for n in names]

    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if not f.startswith(".")
        )
    return files


def _existing_filepaths(dataset, paths):
    coll = db.sample_coll(dataset)
    existing = set()
    batch_size = 10_000
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        existing.update(coll.distinct("filepath", {"filepath": {"$in": batch}}))
    return existing


# -- checking files ---------------------------------------------------------


def _check_all(sources, num_workers):
    """Checks sources in a thread pool; yields lists of
    ``((kind, source), (info, reason))`` in input order."""
    if num_workers is None:
        num_workers = fou.recommend_thread_pool_workers(None)
    num_workers = max(1, min(int(num_workers or 1), 8))

    chunks = [
        sources[i:i + _CHECK_CHUNK] for i in range(0, len(sources), _CHECK_CHUNK)
    ]

    def check_chunk(chunk):
        return [(s, _check_source(*s)) for s in chunk]

    if num_workers == 1 or len(chunks) <= 1:
        for chunk in chunks:
            yield check_chunk(chunk)
        return

    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        # A bounded window keeps memory flat on huge imports
        window = num_workers * 4
        pending = []
        it = iter(chunks)
        for chunk in itertools.islice(it, window):
            pending.append(pool.submit(check_chunk, chunk))
        while pending:
            results = pending.pop(0).result()
            for chunk in itertools.islice(it, 1):
                pending.append(pool.submit(check_chunk, chunk))
            yield results


def _check_source(kind, source):
    """Returns ``(info, None)`` for a valid image, ``(None, reason)``
    otherwise."""
    if kind == "upload":
        import io

        data = source["data"]
        return _probe(io.BytesIO(data), len(data), source["name"])

    try:
        st = os.stat(source)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        if st.st_size == 0:
            return None, "empty file"
        with open(source, "rb") as f:
            return _probe(f, st.st_size, source)
    except FileNotFoundError:
        return None, "file not found"
    except PermissionError:
        return None, "unreadable: permission denied"
    except OSError as e:
        return None, "unreadable: %s" % (e.strerror or e)


def _probe(f, size, name):
    """Opens and decodes an image, returning its media metadata."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(f)
    except UnidentifiedImageError:
        f.seek(0)
        head = f.read(16)
        if _looks_like_image(head, name):
            return None, "corrupt image: unrecognized or damaged header"
        return None, "not an image file"
    except Image.DecompressionBombError as e:
        return None, "image too large: %s" % e
    except Exception as e:
        return None, "corrupt image: %s" % e

    try:
        fmt = img.format
        width, height = img.size
        num_channels = len(img.getbands())
        if fmt in ("JPEG", "MPO"):
            if _flipped(img):
                width, height = height, width
            # Decoding at 1/8 scale still runs every entropy-coded byte
            # through libjpeg, so truncation and bad data are caught
            img.draft(img.mode, ((width + 7) // 8, (height + 7) // 8))
        img.load()
    except Image.DecompressionBombError as e:
        return None, "image too large: %s" % e
    except Exception as e:
        return None, "corrupt image: %s" % (str(e) or type(e).__name__)
    finally:
        img.close()

    mime = _FORMAT_MIME.get(fmt) or Image.MIME.get(fmt)
    if mime is None:
        mime = mimetypes.guess_type(name)[0] or "application/octet-stream"

    return {
        "size_bytes": size,
        "mime_type": mime,
        "width": width,
        "height": height,
        "num_channels": num_channels,
        "format": fmt,
    }, None


def _flipped(img):
    # Same rule as fiftyone.core.metadata.get_image_info: EXIF orientations
    # 5-8 swap width and height
    try:
        return img.getexif().get(0x0112) in {5, 6, 7, 8}
    except Exception:
        return False


def _looks_like_image(head, name):
    if any(head.startswith(m) for m in _IMAGE_MAGIC):
        return True
    mime = mimetypes.guess_type(name)[0]
    return bool(mime and mime.startswith("image/"))


# -- writing ----------------------------------------------------------------


def safe_name(name, fmt=None):
    """Returns a safe file name for an uploaded file: the base name only
    (any directory, ``..`` or drive is dropped), ASCII letters, digits,
    ``.``, ``_`` and ``-``, no leading dot, at most about 100 characters, and
    an extension that matches the detected image format."""
    name = unicodedata.normalize("NFKD", str(name or ""))
    name = name.replace("\\", "/").split("/")[-1]
    name = name.encode("ascii", "ignore").decode("ascii")
    name = _UNSAFE_CHARS.sub("_", name).lstrip("._-")
    stem, ext = os.path.splitext(name)
    stem = stem[:_MAX_NAME].rstrip(".") or "upload"
    ext = ext.lower()[:10]
    wanted = _format_extensions(fmt)
    if wanted and ext not in wanted:
        if ext:
            stem = "%s_%s" % (stem, ext.lstrip("."))
        ext = wanted[0]
    return stem + ext


def _format_extensions(fmt):
    if not fmt:
        return []
    from PIL import Image

    exts = sorted(e for e, f in Image.registered_extensions().items() if f == fmt)
    preferred = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "TIFF": ".tif"}
    first = preferred.get(fmt)
    if first:
        exts = [first] + [e for e in exts if e != first]
        if fmt == "MPO":
            exts += [".jpeg", ".jpe"]
    return exts


def _write_upload(media_dir, upload_, info):
    """Writes an uploaded file under ``media_dir`` with a safe name, never
    overwriting a file: a short random suffix is added on a collision."""
    os.makedirs(media_dir, exist_ok=True)
    root = os.path.realpath(media_dir)
    name = safe_name(upload_["name"], info.get("format"))
    stem, ext = os.path.splitext(name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for attempt in range(20):
        candidate = name if attempt == 0 else "%s-%s%s" % (
            stem, secrets.token_hex(3), ext
        )
        path = os.path.join(root, candidate)
        # Defense in depth: the name has no separator, but check anyway
        if os.path.dirname(os.path.realpath(path)) != root:
            raise BulkLabelingError("Unsafe file name '%s'" % upload_["name"])
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError:
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(upload_["data"])
        except BaseException:
            _remove_files([path])
            raise
        return path

    raise BulkLabelingError(
        "Could not find a free name for '%s' in %s" % (upload_["name"], root)
    )


def _remove_files(paths):
    for path in paths:
        try:
            os.remove(path)
        except OSError:
            pass


def _utcnow():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class _DocFactory(object):
    """Builds sample documents the way FiftyOne's ``add_samples`` does: same
    keys, ``_dataset_id``, ``_media_type``, ``_rand``, ``created_at`` and
    ``last_modified_at``, a unique ``_id`` per label."""

    def __init__(self, dataset, concepts, field, payload, metadata_field):
        self.dataset_id = dataset._doc.id
        self.concepts = concepts
        self.field = field
        self.payload = payload
        self.metadata_field = metadata_field
        try:
            from fiftyone.core.odm.sample import _generate_rand
        except ImportError:  # pragma: no cover
            def _generate_rand():
                return random.random() * 0.001 + 0.999
        self.rand = _generate_rand

    def make(self, _id, filepath, info):
        now = _utcnow()
        doc = {
            "_id": _id,
            "filepath": filepath,
            "tags": [],
            "metadata": {
                "_cls": "ImageMetadata",
                "size_bytes": info["size_bytes"],
                "mime_type": info["mime_type"],
                "width": info["width"],
                "height": info["height"],
                "num_channels": info["num_channels"],
            },
            "_media_type": "image",
            "_rand": self.rand(),
            "_dataset_id": self.dataset_id,
            "created_at": now,
            "last_modified_at": now,
        }
        if self.concepts:
            doc[self.field] = {
                "_cls": "Classifications",
                "classifications": [
                    {"_id": ObjectId(), "_cls": "Classification", "tags": [],
                     "label": name}
                    for name in self.concepts
                ],
            }
        if self.payload:
            doc[self.metadata_field] = self.payload
        return doc


# -- similarity index -------------------------------------------------------


def _sync_similarity_index(dataset, ids):
    """Adds the new samples to the dataset's similarity index, if the smart
    search module is there; returns its message (or None)."""
    try:
        from . import similarity
    except ImportError:
        return None

    try:
        sync = similarity.sync_index
    except AttributeError:
        return None

    try:
        return sync(dataset, added_ids=[str(i) for i in ids])
    except Exception as e:
        logger.warning("Similarity index not updated: %s", e)
        return (
            "The similarity index was not updated (%s); it is stale until it "
            "is rebuilt" % e
        )


def _resume(dataset, op):
    raise BulkLabelingError(
        "An interrupted upload cannot be resumed. Run "
        "bulk_labeling.undo(dataset, '%s') to delete the samples it added, "
        "then upload again; or upload the same paths again with "
        "skip_existing=True to add only the missing files"
        % op.operation_id
    )
    yield  # pragma: no cover (a generator, as resume expects)


history.register_writer(OPERATION_TYPE, _resume)
